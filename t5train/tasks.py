"""Built-in seqio tasks that work offline, registered when t5train.data is imported.

``sort_digits``: the input is a string of 4 to 12 random digits, the target the
same digits in ascending order ("8403" -> "0348"). The byte vocabulary ships
with seqio, so nothing is downloaded. Examples are assigned to a split by a
hash of their input text, so no validation input ever appears in training.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from t5train.text_metrics import exact_match

SORT_DIGITS = 'sort_digits'
MIN_DIGITS, MAX_DIGITS = 4, 12
NUM_VALIDATION_EXAMPLES = 1000
# One input string in this many (by hash) belongs to the validation split.
_VALIDATION_BUCKETS = 10
_TRAIN_SALT, _VALIDATION_SALT = 17, 23


def _digits_example(index: tf.Tensor, salt: int) -> dict[str, tf.Tensor]:
  """Example number ``index`` of a stateless random stream: the same index, the same digits."""
  seed = tf.stack([index, tf.constant(salt, tf.int64)])
  length = tf.random.stateless_uniform([], seed, MIN_DIGITS, MAX_DIGITS + 1, tf.int32)
  digits = tf.random.stateless_uniform([length], seed + 1, 0, 10, tf.int32)
  as_text = lambda d: tf.strings.reduce_join(tf.strings.as_string(d))
  return {'inputs': as_text(digits), 'targets': as_text(tf.sort(digits))}


def _in_validation(example: dict[str, tf.Tensor]) -> tf.Tensor:
  return tf.equal(tf.strings.to_hash_bucket_fast(example['inputs'], _VALIDATION_BUCKETS), 0)


def sort_digits_dataset(split: str, shuffle_files: bool = False, seed: int | None = None
                        ) -> tf.data.Dataset:
  """Infinite training stream (seeded), or a fixed validation set disjoint from it."""
  del shuffle_files  # the stream is generated, there are no files to shuffle
  if split == 'train':
    indices = tf.data.Dataset.counter(start=0, dtype=tf.int64)
    salt = _TRAIN_SALT + 1000 * (seed or 0)
    examples = indices.map(functools.partial(_digits_example, salt=salt),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.filter(lambda ex: tf.logical_not(_in_validation(ex)))
  if split == 'validation':
    indices = tf.data.Dataset.counter(start=0, dtype=tf.int64)
    examples = indices.map(functools.partial(_digits_example, salt=_VALIDATION_SALT))
    return examples.filter(_in_validation).take(NUM_VALIDATION_EXAMPLES)
  raise ValueError(f'{SORT_DIGITS} has splits train and validation, not {split!r}')


def mean_log_likelihood(targets: list[str], scores: list[float]) -> dict[str, float]:
  """Average log-likelihood of the targets under the model (a score metric)."""
  del targets
  return {'log_likelihood': sum(scores) / max(len(scores), 1)}


def _register_sort_digits() -> None:
  vocabulary = seqio.ByteVocabulary()
  features = {name: seqio.Feature(vocabulary=vocabulary, add_eos=True)
              for name in ('inputs', 'targets')}
  seqio.TaskRegistry.add(
      SORT_DIGITS,
      source=seqio.FunctionDataSource(sort_digits_dataset, splits=('train', 'validation')),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features,
      metric_fns=[exact_match, mean_log_likelihood])


def register_builtin_tasks() -> None:
  """Registers the built-in tasks once; later calls do nothing."""
  if SORT_DIGITS not in seqio.TaskRegistry.names():
    _register_sort_digits()


register_builtin_tasks()
