"""``python -m t5train.infer``: decode or score examples with a checkpoint, into JSON Lines.

    python -m t5train.infer --gin_file=gin/models/t5_1_1/tiny.gin \\
        --gin_file=gin/runs/infer.gin --gin_file=gin/tasks/demo.gin \\
        --gin.CHECKPOINT_PATH="'/tmp/run/checkpoint_1000'" --gin.INFER_OUTPUT_DIR="'/tmp/out'"

Gin binds the arguments of ``infer`` (see gin/runs/infer.gin). Each task of the
mixture, or the ``INPUT_FILE``, gives one file ``<name>-<mode>.jsonl``; a file
that already exists is a finished task and is skipped. Jobs that split the
examples (``--shard_id`` / ``--num_shards``, or ``infer.shard_id`` /
``infer.num_shards``, as in T5X) each write their shard as T5X names it,
``<name>-<mode>.jsonl-00000-of-00002``.
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
  profiling,
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
          decoder_params: dict[str, Any] | None = None, random_seed: int | None = 0,
          shard_id: int = 0, num_shards: int = 1,
          profile_batches: Sequence[int] | None = None) -> list[str]:
  """Writes one JSONL file per task (or for ``input_file``); returns their paths.

  With ``num_shards`` > 1 this job infers shard ``shard_id`` of each task's examples (every
  ``num_shards``-th, from the ``shard_id``-th) into ``<name>-<mode>.jsonl-<shard_id>-of-
  <num_shards>`` (five digits each, T5X's names); the shards' files together hold the lines of
  the unsharded file. ``dataset_cfg.task_feature_lengths = None``: the longest of each feature
  in the examples (of all shards, so every shard decodes alike). ``profile_batches``
  (PROFILE_BATCHES, ``(first, last)``, counted over all tasks from 1) traces those batches with
  ``jax.profiler`` into ``output_dir/plugins/profile``.
  """
  _GUARD.enter()
  if not 0 <= shard_id < num_shards:
    raise UserError(f'shard_id must be in [0, num_shards): shard_id={shard_id}, '
                    f'num_shards={num_shards}')
  random_seed = gin_utils.resolve_random_seed(random_seed, infer)
  profile_range = profiling.parse_range(profile_batches, 'PROFILE_BATCHES')
  from t5train import data  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  if mode not in MODES:
    raise UserError(f"infer mode must be one of {', '.join(MODES)}, not {mode!r}")
  if dataset_cfg is None:
    raise UserError('infer needs dataset_cfg (a data.DatasetConfig with the feature lengths)')
  if input_file is None and not dataset_cfg.mixture_or_task_name:
    raise UserError('set MIXTURE_OR_TASK_NAME or INPUT_FILE: there is nothing to infer')
  data.check_vocabularies(model, None if input_file is not None else dataset_cfg)
  step, checkpoint_dir = checkpoints.select_checkpoints(restore_checkpoint_cfg)[-1]
  given = dataset_cfg.task_feature_lengths
  if input_file is not None:
    name = os.path.basename(input_file)
    sources = {name: lambda: data.file_examples(input_file, model.input_vocabulary,
                                                 model.output_vocabulary, given, num_examples,
                                                 shard_id, num_shards)}
    lengths = dict(given) if given is not None else _longest(data.file_examples(
        input_file, model.input_vocabulary, model.output_vocabulary, None, num_examples))
  else:
    names = data.subtask_names(dataset_cfg)
    sources = {task: (lambda task=task: data.pretokenized_examples(
        _task_config(dataset_cfg, task), num_examples, shard_id, num_shards)) for task in names}
    lengths = data.max_feature_lengths(dataset_cfg, num_examples)
  if given is None:
    logging.info('TASK_FEATURE_LENGTHS = None: the longest in the data are %s.', lengths)
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
  profiler = profiling.RangeProfiler(*profile_range, output_dir) if profile_range else None
  runner.batch_observer = profiler
  try:
    return _infer_sources(sources, directory, mode, shard_id, num_shards, model, runner, params,
                          lengths, include_tokens)
  finally:
    if profiler is not None:
      profiler.close()


def _infer_sources(sources: dict[str, Any], directory: Any, mode: str, shard_id: int,
                   num_shards: int, model: models.BaseTransformerModel,
                   runner: inference.InferenceRunner, params: Any, lengths: dict[str, int],
                   include_tokens: bool) -> list[str]:
  """Infers each source that has no output file yet; returns the paths of all output files."""
  written = []
  for name, read_examples in sources.items():
    path = paths.join(directory, output_file_name(name, mode, shard_id, num_shards))
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


def output_file_name(name: str, mode: str, shard_id: int = 0, num_shards: int = 1) -> str:
  """``<name>-<mode>.jsonl``, and for a shard of several T5X's
  ``<name>-<mode>.jsonl-<shard_id:05>-of-<num_shards:05>``."""
  if num_shards == 1:
    return f'{name}-{mode}.jsonl'
  return f'{name}-{mode}.jsonl-{shard_id:05}-of-{num_shards:05}'


def _longest(examples: Sequence[dict[str, Any]]) -> dict[str, int]:
  """The longest of each token feature of ``examples`` (TASK_FEATURE_LENGTHS = None)."""
  lengths: dict[str, int] = {}
  for example in examples:
    for feature in ('inputs', 'targets'):
      if feature in example:
        lengths[feature] = max(lengths.get(feature, 0), len(example[feature]))
  lengths.setdefault('targets', lengths.get('inputs', 1))
  return lengths


def _task_config(dataset_cfg: Any, task: str) -> Any:
  return dataclasses.replace(dataset_cfg, mixture_or_task_name=task, module=None)


# T5X's arguments too (T5X's run files bind them): see t5x_compat.binaries.
infer = t5x_binaries.accepts_t5x_arguments(infer)

console_main = gin_utils.configured_binary(infer, _GUARD, 't5train.infer')


if __name__ == '__main__':
  # Gin files bind ``t5train.infer.infer``; run the importable copy of this module.
  from t5train import infer as _infer_module  # pylint: disable=g-import-not-at-top
  _infer_module.console_main()
