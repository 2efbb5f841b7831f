"""T5's pretraining objective, span corruption (Raffel et al. 2020), as seqio preprocessors.

A stream of tokenized documents becomes (inputs, targets) pairs: a random chunk of each document;
documents concatenated and cut into segments whose noised form fills the inputs exactly; then about
``noise_density`` of each segment's tokens, in spans of mean length ``mean_noise_span_length``,
replaced by one sentinel per span in the inputs, while the targets hold each sentinel followed by
the span it replaced. Random numbers come from seqio's seed manager in the same order and from the
same stateless ops as in the `t5` package, so a seed gives T5's own tokens. No file I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5train.errors import UserError

_MAX_CHUNK_LENGTH = 65536  # tokens kept of one document, as T5
_CONCAT_BATCH = 128  # documents concatenated before splitting, as T5

Example = dict[str, tf.Tensor]


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
  """(raw tokens per segment, targets length), both as T5 computes them: the longest segment whose
  noised inputs (one sentinel per span, plus EOS) fit ``inputs_length``; the targets count EOS too."""
  def noised_lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while noised_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  noised_inputs_length, targets_length = noised_lengths(tokens_length)
  # As T5: at density 0.5, one token fewer keeps the targets no longer than the inputs.
  if noise_density == 0.5 and targets_length > noised_inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _noise_counts(length: tf.Tensor, noise_density: float,
                  mean_noise_span_length: float) -> tuple[tf.Tensor, tf.Tensor]:
  """(noise tokens, noise spans) of a mask over ``length`` >= 2 tokens, element-wise: at least one
  noise and one non-noise token, at least one span."""
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  return num_noise, tf.maximum(num_spans, 1)


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """Lengths [num_segments] of non-empty segments partitioning ``num_items``, all partitions equally
  likely (needs num_segments <= num_items)."""
  is_boundary = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  first_in_segment = tf.pad(seqio.stateless_shuffle(is_boundary, seed), [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds: tf.Tensor,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """A boolean mask [length] of alternating non-noise and noise spans, non-noise first.

  round(length * noise_density) noise tokens in round(that / mean_noise_span_length) spans;
  ``seeds`` [2, 2] draw the noise and the non-noise span lengths.
  """
  original_length = length
  length = tf.maximum(length, 2)
  num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2])
  span_starts = tf.cumsum(span_lengths)[:-1]
  is_span_start = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
  is_noise = tf.equal(tf.cumsum(is_span_start) % 2, 1)
  return is_noise[:original_length]


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """``tokens`` with each run of masked tokens replaced by one sentinel: the first run by
  ``vocab_size - 1``, the next by ``vocab_size - 2``, and so on (seqio puts extra_ids on top)."""
  previous_masked = tf.pad(mask[:-1], [[1, 0]])
  first = tf.logical_and(mask, tf.logical_not(previous_masked))
  later = tf.logical_and(mask, previous_masked)
  sentinels = vocab_size - tf.cumsum(tf.cast(first, tokens.dtype))
  return tf.boolean_mask(tf.where(first, sentinels, tokens), tf.logical_not(later))


def _chunk_starts(seeds: tf.Tensor, num_tokens: tf.Tensor) -> tf.Tensor:
  """Where each document's chunk starts: a multiple of _MAX_CHUNK_LENGTH drawn as T5 draws it
  from the document's own seed ([documents, 2]), and 0 for a document of one chunk, whose draw
  can only give 0 (so it is skipped when no document of the batch is longer)."""
  num_chunks = tf.cast(tf.math.ceil(tf.cast(num_tokens, tf.float32) / _MAX_CHUNK_LENGTH),
                       tf.int32)

  def draw(args: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
    seed, chunks = args
    second = tf.random.experimental.stateless_split(seed)[1]  # T5 uses the second
    return _MAX_CHUNK_LENGTH * tf.random.stateless_uniform([], maxval=chunks, dtype=tf.int32,
                                                           seed=second)

  return tf.cond(tf.reduce_any(num_chunks > 1),
                 lambda: tf.map_fn(draw, (seeds, num_chunks), fn_output_signature=tf.int32),
                 lambda: tf.zeros_like(num_chunks))


def _map_seeds() -> tf.data.Dataset:
  """The seeds ``seqio.map_over_dataset(num_seeds=1)`` would give the elements of the next map,
  one (int64, int64) pair per element, taking that map's place in the seed manager's sequence
  (seqio 0.0.20's ``_GrainRandomMapFn``). Zipping them with a dataset gives each element T5's
  seed without a per-element map."""
  import seqio.utils as seqio_utils  # pylint: disable=g-import-not-at-top
  first = seqio_utils._NEXT_MAP_SEED  # pylint: disable=protected-access
  if first is None:  # no seed manager: seqio draws fresh seeds
    pair = (None, None)
  else:
    pair = (first, first + 1)
    seqio_utils._NEXT_MAP_SEED = first + 2  # pylint: disable=protected-access
  return tf.data.Dataset.zip(tuple(tf.data.Dataset.random(seed) for seed in pair))


def _document_groups(dataset: tf.data.Dataset, batched: bool) -> tf.data.Dataset:
  """The non-empty documents' tokens in consecutive groups of _CONCAT_BATCH (the last group of a
  finite stream shorter), each a ragged [documents, None] tensor: T5's grouping in
  ``reduce_concat_tokens``. ``batched``: the elements are already batches of documents, of any
  size, which are regrouped a batch at a time instead of a document at a time."""
  if not batched:
    documents = dataset.map(lambda ex: ex['targets'])
    documents = documents.filter(lambda tokens: tf.size(tokens) > 0)
    return documents.ragged_batch(_CONCAT_BATCH)
  batches = dataset.map(lambda ex: tf.ragged.boolean_mask(
      ex['targets'], ex['targets'].row_lengths() > 0))
  return _regrouped(batches, _CONCAT_BATCH)


def _regrouped(batches: tf.data.Dataset, size: int) -> tf.data.Dataset:
  """Ragged batches [rows, None] of any sizes as consecutive batches of ``size`` rows, the last
  one shorter when the stream ends: the rows of an incomplete group wait for the next batch."""
  spec = batches.element_spec
  # tf.data's scan keeps dense state only: the waiting rows are their values and lengths.
  waiting = (tf.zeros([0], spec.dtype), tf.zeros([0], spec.row_splits_dtype))
  # A last element says the stream has ended, so that the rows still waiting go out.
  marked = batches.map(lambda batch: (batch.flat_values, batch.row_lengths(), False)).concatenate(
      tf.data.Dataset.from_tensors(waiting + (True,)))

  def step(waiting: tuple[tf.Tensor, tf.Tensor], element: tuple[tf.Tensor, tf.Tensor, tf.Tensor]
           ) -> tuple[tuple[tf.Tensor, tf.Tensor], tf.RaggedTensor]:
    values, lengths, last = element
    values, lengths = tf.concat([waiting[0], values], 0), tf.concat([waiting[1], lengths], 0)
    num_rows = tf.size(lengths, out_type=lengths.dtype)
    num_groups = num_rows // size + tf.cast(last & (num_rows % size > 0), num_rows.dtype)
    taken = tf.minimum(num_groups * size, num_rows)
    num_values = tf.reduce_sum(lengths[:taken])
    group_rows = tf.minimum(tf.cast(size, num_rows.dtype),
                            taken - tf.range(num_groups, dtype=num_rows.dtype) * size)
    groups = tf.RaggedTensor.from_nested_row_lengths(values[:num_values],
                                                      [group_rows, lengths[:taken]])
    return (values[num_values:], lengths[taken:]), groups

  return marked.scan(waiting, step).unbatch()


def _chunks_concatenated(groups: tf.data.Dataset) -> tf.data.Dataset:
  """T5's ``select_random_chunk`` (one random _MAX_CHUNK_LENGTH-token chunk of each document)
  then ``reduce_concat_tokens`` (each group of documents joined into one sequence, token 0
  dropped as padding), a group at a time: each document keeps the seed T5 gives it, from the
  seed stream of the map T5 runs per document."""
  def join(tokens: tf.RaggedTensor, seeds: tuple[tf.Tensor, tf.Tensor]) -> Example:
    num_documents = tokens.nrows(out_type=tf.int32)
    document_seeds = tf.stack(seeds, axis=1)[:num_documents]
    starts = _chunk_starts(document_seeds, tokens.row_lengths())
    ends = tf.minimum(starts + _MAX_CHUNK_LENGTH, tf.cast(tokens.row_lengths(), tf.int32))
    rows = tokens.value_rowids()
    positions = tf.ragged.range(tokens.row_lengths()).flat_values
    keep = ((positions >= tf.cast(tf.gather(starts, rows), positions.dtype)) &
            (positions < tf.cast(tf.gather(ends, rows), positions.dtype)) &
            tf.cast(tokens.flat_values, tf.bool))
    return {'targets': tf.boolean_mask(tokens.flat_values, keep)}

  # Every group but the last has _CONCAT_BATCH documents, so the seeds go in step with them.
  seeds = _map_seeds().batch(_CONCAT_BATCH)
  return tf.data.Dataset.zip((groups, seeds)).map(join, num_parallel_calls=tf.data.AUTOTUNE)


def _split(dataset: tf.data.Dataset, segment_length: int) -> tf.data.Dataset:
  """Each sequence cut into segments of ``segment_length`` tokens (the last may be shorter)."""
  # The cut is not random, but T5 draws a seed for it: drawing one too keeps later seeds in step.
  @seqio.map_over_dataset(num_seeds=1)
  def segments(example: Example, seed: tf.Tensor) -> Example:
    del seed
    tokens = example['targets']
    num_tokens = tf.size(tokens, out_type=tf.int64)
    starts = tf.range(0, num_tokens, segment_length)
    lengths = tf.minimum(starts + segment_length, num_tokens) - starts
    return {'targets': tf.RaggedTensor.from_row_lengths(tokens, lengths)}

  nonempty = dataset.filter(lambda ex: tf.size(ex['targets']) > 0)
  return segments(nonempty).unbatch()


def _noise(dataset: tf.data.Dataset, vocab_size: int, noise_density: float,
           mean_noise_span_length: float) -> tf.data.Dataset:
  """Inputs: the segment with each noise span as a sentinel; targets: the complement."""
  @seqio.map_over_dataset(num_seeds=1)
  def noise(example: Example, seed: tf.Tensor) -> Example:
    # T5 splits six seeds (mask, inputs, targets) and only the mask's two are used.
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    tokens = example['targets']
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds[:2],
                                   mean_noise_span_length)
    return {'inputs': spans_to_sentinels(tokens, mask, vocab_size),
            'targets': spans_to_sentinels(tokens, tf.logical_not(mask), vocab_size)}

  return noise(dataset)


def _check_spans(segment_length: int, noise_density: float, mean_noise_span_length: float,
                 extra_ids: int | None) -> None:
  """Fails fast where T5's mask would fail mid-training, or its sentinels run out of extra_ids."""
  lengths = np.maximum(np.arange(1, segment_length + 1, dtype=np.int32), 2)  # as the mask sees them
  num_noise, num_spans = (t.numpy() for t in _noise_counts(
      tf.constant(lengths), noise_density, mean_noise_span_length))
  crowded = np.flatnonzero(num_spans > lengths - num_noise)
  if crowded.size:
    raise UserError(
        f'NOISE_DENSITY {noise_density} with MEAN_NOISE_SPAN_LENGTH {mean_noise_span_length} '
        f'leaves a segment of {crowded[0] + 1} tokens more noise spans than non-noise tokens to '
        'separate them; lower the density or lengthen the spans')
  if extra_ids is not None and num_spans.max() > extra_ids:
    raise UserError(f'span corruption of {segment_length}-token segments uses up to '
                    f'{num_spans.max()} sentinels but the vocabulary has {extra_ids} extra_ids; '
                    'give it more or shorten the inputs')


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    mean_noise_span_length: float = 3.0,
                    noise_density: float = 0.15,
                    batched: bool = False) -> tf.data.Dataset:
  """T5's span corruption of tokenized 'targets' documents into (inputs, targets) examples, the
  inputs sized to fill ``sequence_length['inputs']`` once EOS is appended.

  ``batched``: each element holds a batch of documents in stream order, 'targets' a ragged
  [documents, None] tensor (as ``file_tasks.tokenize_in_batches(unbatch=False)`` gives); the
  examples are the same as of the documents one by one, with the per-document work done a batch
  at a time.
  """
  if not 0 < noise_density < 1:
    raise UserError(f'NOISE_DENSITY must be between 0 and 1 (exclusive), not {noise_density}')
  if mean_noise_span_length < 1:
    raise UserError(f'MEAN_NOISE_SPAN_LENGTH must be at least 1, not {mean_noise_span_length}')
  segment_length, targets_length = random_spans_helper(
      sequence_length['inputs'], noise_density, mean_noise_span_length)
  if sequence_length['targets'] < targets_length:
    raise UserError(f"span corruption with inputs of {sequence_length['inputs']} tokens needs "
                    f"targets of {targets_length}; TASK_FEATURE_LENGTHS['targets'] is "
                    f"{sequence_length['targets']}")
  vocabulary = output_features['targets'].vocabulary
  if 'inputs' in output_features and output_features['inputs'].vocabulary != vocabulary:
    raise UserError('span corruption needs one vocabulary for inputs and targets')
  _check_spans(segment_length, noise_density, mean_noise_span_length,
               getattr(vocabulary, 'extra_ids', None))
  dataset = _chunks_concatenated(_document_groups(dataset, batched))
  dataset = _split(dataset, segment_length)
  return _noise(dataset, vocabulary.vocab_size, noise_density, mean_noise_span_length)
