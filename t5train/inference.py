"""The inference loop: examples in fixed-size, sharded batches through the model's decode or score.

``InferenceRunner`` owns the compiled predict and score functions. It takes
padded model features of single examples, so the same loop serves the infer
binary, seqio's Evaluator and evaluation during training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from t5train import data, models
from t5train.partitioning import PjitPartitioner
from t5train.train_state import TrainStateInitializer

Features = Mapping[str, np.ndarray]  # one example's model features, padded

# Inputs are cut to the shortest of these fractions of their padded length that holds every
# input of the batch: a few compiled shapes, and an encoder that works on real tokens. Below 32
# positions the encoder's work is too small to pay for another compilation (measured on the
# demo: a bucket of 8 beside the padded 16 made its evaluation slower), so no bucket is shorter.
INPUT_BUCKET_FRACTIONS = (8, 4, 2, 1)
MIN_INPUT_BUCKET = 32


def input_length(features: Features) -> int:
  """Position after an example's last input token (0 for a model without encoder inputs)."""
  tokens = features.get('encoder_input_tokens')
  if tokens is None:
    return 0
  nonzero = np.flatnonzero(np.asarray(tokens))
  return int(nonzero[-1]) + 1 if nonzero.size else 0


def smallest_bucket(length: int, buckets: Sequence[int]) -> int | None:
  """The first of ``buckets`` (ascending) that holds ``length``; None if none does."""
  return next((bucket for bucket in buckets if bucket >= length), None)


def input_bucket(length: int, padded_length: int) -> int:
  """The shortest bucket of ``padded_length`` (see INPUT_BUCKET_FRACTIONS) that holds ``length``."""
  buckets = [padded_length // fraction for fraction in INPUT_BUCKET_FRACTIONS]
  return smallest_bucket(max(length, MIN_INPUT_BUCKET), buckets) or padded_length


def text(value: Any) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def params_initializer(model: models.BaseTransformerModel, partitioner: PjitPartitioner,
                       batch_size: int, task_feature_lengths: Mapping[str, int]
                       ) -> TrainStateInitializer:
  """Shapes and shardings of the model's state for batches of ``batch_size`` examples."""
  return TrainStateInitializer(model.optimizer_def, model.get_initial_variables,
                               model.input_shapes(batch_size, task_feature_lengths),
                               partitioner=partitioner)


class InferenceRunner:
  """Compiled, sharded predict and score functions over batches of ``batch_size`` examples.

  Examples are decoded in order of input length and returned in their own order, and each
  batch's encoder inputs are cut to a bucket (``input_bucket``) that holds its longest
  input, so a set of mostly short inputs costs in proportion to its real tokens; this
  needs at most one compilation per bucket. ``bucket_inputs=False`` keeps the padded
  length. The last batch is filled up with copies of its last example.
  """

  def __init__(self, model: models.BaseTransformerModel, partitioner: PjitPartitioner,
               param_shardings: Any, batch_size: int, max_decode_length: int,
               decoder_params: Mapping[str, Any] | None = None, seed: int = 0,
               bucket_inputs: bool = True, batch_observer: Any = None):
    self._model = model
    # Told ``before(n)`` a batch is handed out and ``after(n)`` once the next is asked for (its
    # results fetched by then), n counting from 1 over all calls: e.g. a RangeProfiler.
    self.batch_observer = batch_observer
    self._batches_run = 0
    self._partitioner = partitioner
    self._batch_size = batch_size
    self._bucket_inputs = bucket_inputs
    partitioner.get_data_layout(batch_size)  # a UserError if the batch does not split evenly
    self._batch_sharding = partitioner.sharding(partitioner.data_partition_spec)
    self._rng = jax.random.PRNGKey(seed)
    replicated = partitioner.sharding(PartitionSpec())
    self._predict = partitioner.partition(
        lambda params, batch, rng: model.predict_batch_with_aux(
            params, batch, rng, dict(decoder_params or {}), max_decode_length=max_decode_length),
        in_shardings=(param_shardings, self._batch_sharding, replicated),
        out_shardings=replicated)
    self._score = partitioner.partition(
        model.score_batch, in_shardings=(param_shardings, self._batch_sharding),
        out_shardings=replicated)

  def _order(self, features: Sequence[Features]) -> list[int]:
    """The order examples are decoded in: by input length when inputs are bucketed."""
    if not self._bucket_inputs:
      return list(range(len(features)))
    return sorted(range(len(features)), key=lambda i: input_length(features[i]))

  def _batches(self, features: Sequence[Features]) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """(global batch, number of real examples in it)."""
    for start in range(0, len(features), self._batch_size):
      chunk = list(features[start:start + self._batch_size])
      real = len(chunk)
      chunk += [chunk[-1]] * (self._batch_size - real)
      cut = {}
      if self._bucket_inputs and 'encoder_input_tokens' in chunk[0]:
        padded = len(chunk[0]['encoder_input_tokens'])
        cut['encoder_input_tokens'] = input_bucket(max(map(input_length, chunk)), padded)
      batch = {}
      for name in chunk[0]:
        # Every process holds the whole batch; each contributes the rows of its own devices.
        host = np.stack([example[name][:cut.get(name)] for example in chunk])
        batch[name] = jax.make_array_from_callback(host.shape, self._batch_sharding,
                                                   lambda index, h=host: h[index])
      self._batches_run += 1
      if self.batch_observer is not None:
        self.batch_observer.before(self._batches_run)
      yield batch, real
      if self.batch_observer is not None:
        self.batch_observer.after(self._batches_run)

  def predict(self, params: Any, features: Sequence[Features]
              ) -> tuple[list[np.ndarray], list[float]]:
    """The best decode (token ids, 0 after EOS) of each example, and its score."""
    order = self._order(features)
    tokens, scores = [], []
    for number, (batch, real) in enumerate(self._batches([features[i] for i in order])):
      decoded, aux = jax.device_get(
          self._predict(params, batch, jax.random.fold_in(self._rng, number)))
      tokens.extend(np.asarray(decoded)[:real])
      scores.extend(float(s) for s in np.asarray(aux['scores'])[:real])
    return _in_order(tokens, order), _in_order(scores, order)

  def score(self, params: Any, features: Sequence[Features]) -> list[float]:
    """Log-likelihood of each example's targets."""
    order = self._order(features)
    scores: list[float] = []
    for batch, real in self._batches([features[i] for i in order]):
      scores.extend(float(s) for s in np.asarray(jax.device_get(self._score(params, batch)))[:real])
    return _in_order(scores, order)


def _in_order(values: list[Any], order: Sequence[int]) -> list[Any]:
  """``values`` computed in ``order`` (positions of the examples), put back in example order."""
  result: list[Any] = [None] * len(values)
  for value, position in zip(values, order):
    result[position] = value
  return result


@dataclasses.dataclass(frozen=True)
class Prediction:
  inputs: str
  target: str
  prediction: str


def predict_split(model: models.BaseTransformerModel, partitioner: PjitPartitioner, params: Any,
                  param_shardings: Any, dataset_config: data.DatasetConfig,
                  num_examples: int) -> list[Prediction]:
  """Predictions for the first ``num_examples`` of a task split, with their targets."""
  lengths = dict(dataset_config.task_feature_lengths)
  examples = data.pretokenized_examples(dataset_config, num_examples)
  runner = InferenceRunner(model, partitioner, param_shardings, dataset_config.batch_size,
                           lengths['targets'])
  tokens, _ = runner.predict(params, [model.example_features(ex, lengths) for ex in examples])
  return [Prediction(inputs=text(ex.get('inputs_pretokenized', '')),
                     target=text(ex.get('targets_pretokenized', '')),
                     prediction=model.output_vocabulary.decode(row.tolist()))
          for ex, row in zip(examples, tokens)]


def exact_match(predictions: Sequence[Prediction]) -> float:
  """Fraction of predictions equal to their target text."""
  return sum(p.prediction == p.target for p in predictions) / max(len(predictions), 1)
