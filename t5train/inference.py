"""The predict loop: batches of examples through a model's decode function, back to text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from t5train import data, models
from t5train.partitioning import PjitPartitioner


@dataclasses.dataclass(frozen=True)
class Prediction:
  inputs: str
  target: str
  prediction: str


def _pad(tokens: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(tokens), length), np.int32)
  for i, t in enumerate(tokens):
    t = np.asarray(t)[:length]
    out[i, :len(t)] = t
  return out


def _text(value: Any) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def predict_examples(model: models.EncoderDecoderModel, partitioner: PjitPartitioner,
                     params: Any, param_shardings: Any, examples: Sequence[dict[str, Any]],
                     task_feature_lengths: dict[str, int], batch_size: int) -> list[Prediction]:
  """Decodes ``examples`` (seqio-preprocessed, with text and token ids) in fixed-size batches."""
  input_length, target_length = task_feature_lengths['inputs'], task_feature_lengths['targets']
  batch_sharding = partitioner.sharding(partitioner.data_partition_spec)
  predict = partitioner.partition(
      lambda p, tokens: model.predict_batch(p, {'encoder_input_tokens': tokens},
                                            max_decode_length=target_length),
      in_shardings=(param_shardings, batch_sharding),
      out_shardings=partitioner.sharding(PartitionSpec()))
  predictions = []
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed shape: one compilation
    host_tokens = _pad([ex['inputs'] for ex in padded], input_length)
    # Every process holds the whole batch; each contributes the rows of its own devices.
    tokens = jax.make_array_from_callback(host_tokens.shape, batch_sharding,
                                          lambda index, t=host_tokens: t[index])
    decoded = np.asarray(jax.device_get(predict(params, tokens)))
    for example, row in zip(chunk, decoded):
      predictions.append(Prediction(
          inputs=_text(example.get('inputs_pretokenized', '')),
          target=_text(example.get('targets_pretokenized', '')),
          prediction=model.output_vocabulary.decode(row.tolist())))
  return predictions


def predict_split(model: models.EncoderDecoderModel, partitioner: PjitPartitioner, params: Any,
                  param_shardings: Any, dataset_config: data.DatasetConfig,
                  num_examples: int) -> list[Prediction]:
  """Predictions for the first ``num_examples`` of a task split, with their targets."""
  examples = data.pretokenized_examples(dataset_config, num_examples)
  return predict_examples(model, partitioner, params, param_shardings, examples,
                          dict(dataset_config.task_feature_lengths), dataset_config.batch_size)


def exact_match(predictions: Sequence[Prediction]) -> float:
  """Fraction of predictions equal to their target text."""
  return sum(p.prediction == p.target for p in predictions) / max(len(predictions), 1)
