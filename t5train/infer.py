"""``python -m t5train.infer``: decode or score examples with a checkpoint, into JSON Lines.

    python -m t5train.infer --gin_file=gin/models/t5_1_1/tiny.gin \\
        --gin_file=gin/runs/infer.gin --gin_file=gin/tasks/demo.gin \\
        --gin.CHECKPOINT_PATH="'/tmp/run/checkpoint_1000'" --gin.INFER_OUTPUT_DIR="'/tmp/out'"

Gin binds the arguments of ``infer`` (see gin/runs/infer.gin). Each task of the
mixture, or the ``INPUT_FILE``, gives one file ``<name>-<mode>.jsonl``; a file
that already exists is a finished task and is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from t5train import (
  checkpoint_reading,
  checkpoints,
  gin_utils,
  inference,
  models,
  multihost,
  partitioning,
  paths,
)
from t5train.errors import UserError
from t5train.t5x_compat import binaries as t5x_binaries

_GUARD = gin_utils.GinCallGuard()
MODES = ('predict', 'predict_with_aux', 'score')


def _example_text(example: dict[str, Any], feature: str, vocabulary: Any) -> str:
  """A feature's text as read, or its decoded tokens where a preprocessor made them (span
  corruption's sentinel-marked inputs)."""
  if f'{feature}_pretokenized' in example:
    return inference.text(example[f'{feature}_pretokenized'])
  return vocabulary.decode([int(t) for t in example[feature]]) if feature in example else ''


def _records(mode: str, examples: Sequence[dict[str, Any]], model: models.BaseTransformerModel,
             runner: inference.InferenceRunner, params: Any, lengths: dict[str, int],
             include_tokens: bool) -> list[dict[str, Any]]:
  """One JSON object per example, with the fields of ``mode``."""
  features = [model.example_features(ex, lengths) for ex in examples]
  records = [{'inputs': _example_text(ex, 'inputs', model.input_vocabulary)} for ex in examples]
  for record, example in zip(records, examples):
    if 'targets_pretokenized' in example or 'targets' in example:
      record['targets'] = _example_text(example, 'targets', model.output_vocabulary)
  if mode == 'score':
    if any('decoder_target_tokens' not in f for f in features):
      raise UserError("mode='score' needs targets for every example")
    for record, score in zip(records, runner.score(params, features)):
      record['score'] = score
    return records
  tokens, scores = runner.predict(params, features)
  for record, row, score in zip(records, tokens, scores):
    record['prediction'] = model.output_vocabulary.decode(row.tolist())
    if include_tokens:
      eos = getattr(model.output_vocabulary, 'eos_id', 1)
      ids = row.tolist()
      record['prediction_tokens'] = ids[:ids.index(eos) + 1] if eos in ids else ids
    if mode == 'predict_with_aux':
      record['aux'] = {'scores': score}
  return records


def _write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
  """Writes ``path`` whole or not at all (a temporary file renamed into place)."""
  paths.write_text_atomically(
      path, ''.join(json.dumps(record, ensure_ascii=False) + '\n' for record in records))


def infer(*, model: models.BaseTransformerModel, partitioner: partitioning.PjitPartitioner,
          restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig, output_dir: str,
          dataset_cfg: Any = None, input_file: str | None = None, mode: str = 'predict',
          num_examples: int | None = None, include_tokens: bool = False,
          decoder_params: dict[str, Any] | None = None, random_seed: int = 0) -> list[str]:
  """Writes one JSONL file per task (or for ``input_file``); returns their paths."""
  _GUARD.enter()
  gin_utils.log_overridden_bindings('checkpoints.RestoreCheckpointConfig',
                                    checkpoints.RestoreCheckpointConfig, 'infer', 't5train.infer')
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  if mode not in MODES:
    raise UserError(f"infer mode must be one of {', '.join(MODES)}, not {mode!r}")
  if dataset_cfg is None:
    raise UserError('infer needs dataset_cfg (a data.DatasetConfig with the feature lengths)')
  if input_file is None and not dataset_cfg.mixture_or_task_name:
    raise UserError('set MIXTURE_OR_TASK_NAME or INPUT_FILE: there is nothing to infer')
  step, checkpoint_dir = checkpoints.select_checkpoints(restore_checkpoint_cfg)[-1]
  lengths = dict(dataset_cfg.task_feature_lengths)
  if input_file is not None:
    name = os.path.basename(input_file)
    sources = {name: lambda: data.file_examples(input_file, model.input_vocabulary,
                                                 model.output_vocabulary, lengths, num_examples)}
  else:
    names = data.subtask_names(dataset_cfg)
    sources = {task: (lambda task=task: data.pretokenized_examples(
        _task_config(dataset_cfg, task), num_examples)) for task in names}
  partitioner.validate()
  initializer = inference.params_initializer(model, partitioner, dataset_cfg.batch_size, lengths)
  params = checkpoint_reading.restore_params(checkpoint_dir, initializer,
                                             restore_checkpoint_cfg.dtype)
  logging.info('Restored step %d from %s.', step, checkpoint_dir)
  runner = inference.InferenceRunner(model, partitioner, initializer.train_state_shardings.params,
                                     dataset_cfg.batch_size, lengths['targets'], decoder_params,
                                     seed=random_seed)
  directory = paths.resolve(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, read_examples in sources.items():
    path = paths.join(directory, f'{name}-{mode}.jsonl')
    if epath.Path(path).exists():
      logging.info('%s already exists; skipping %s.', path, name)
      written.append(path)
      continue
    examples = read_examples()
    records = _records(mode, examples, model, runner, params, lengths, include_tokens)
    if multihost.is_primary():
      _write_jsonl(path, records)
    logging.info('Wrote %d examples of %s to %s.', len(records), name, path)
    written.append(path)
  return written


def _task_config(dataset_cfg: Any, task: str) -> Any:
  return dataclasses.replace(dataset_cfg, mixture_or_task_name=task, module=None)


# T5X's arguments too (T5X's run files bind them): see t5x_compat.binaries.
infer = t5x_binaries.accepts_t5x_arguments(infer)

console_main = gin_utils.configured_binary(infer, _GUARD, 't5train.infer')


if __name__ == '__main__':
  # Gin files bind ``t5train.infer.infer``; run the importable copy of this module.
  from t5train import infer as _infer_module  # pylint: disable=g-import-not-at-top
  _infer_module.console_main()
