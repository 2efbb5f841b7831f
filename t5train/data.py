"""The seqio adapter: datasets for a task or mixture, batched and turned into global jax.Arrays.

The only service module that imports TensorFlow and seqio (both are slow to
import and absent on some accelerator images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf

from t5train import file_formats, file_tasks, tasks  # (tasks registers built-ins)
from t5train.errors import UserError
from t5train.file_formats import Columns

# TensorFlow only feeds data; leave every accelerator to JAX.
tf.config.set_visible_devices([], 'GPU')

Batch = dict[str, np.ndarray]
_PREFETCH_BATCHES = 2  # made ahead of the loop; held in iterator checkpoints, so resumes are exact


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which data to read and how (T5X's field names)."""

  mixture_or_task_name: str
  # None (eval and infer, as T5X's eval.gin): the longest of each feature in the data.
  task_feature_lengths: Mapping[str, int] | None
  split: str = 'train'
  batch_size: int = 32  # global, over all hosts
  shuffle: bool = True
  seed: int | None = None
  use_cached: bool = False
  pack: bool = False
  module: str | None = None  # imported first; it may register more tasks


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture, or a UserError that lists what is registered."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    shown = ', '.join(known[:20]) + (', ...' if len(known) > 20 else '')
    raise UserError(f'unknown task or mixture {name!r}; registered: {shown}. Register yours in a '
                    'module and import it from a gin file') from None


def task_for(config: DatasetConfig) -> seqio.Task | seqio.Mixture:
  """The task or mixture of ``config``, after importing the module that registers it; with
  ``use_cached``, a UserError naming the first of its tasks that seqio's cache lacks."""
  if config.module:
    try:
      importlib.import_module(config.module)
    except ImportError as e:
      raise UserError(f'cannot import task module {config.module!r}: {e}') from e
  task = get_mixture_or_task(config.mixture_or_task_name)
  if config.use_cached:
    check_cached(task)
  return task


def check_cached(task: seqio.Task | seqio.Mixture) -> None:
  """A UserError naming the first task of ``task`` that no seqio cache directory holds
  (``use_cached = True``, T5X's ``USE_CACHED_TASKS``, reads the cache only, as in T5X)."""
  for subtask in seqio.get_subtasks(task):
    if not subtask.cache_dir:
      dirs = ', '.join(seqio.get_global_cache_dirs()) or 'none'
      raise UserError(f'task {subtask.name!r} is not cached: USE_CACHED_TASKS = True (T5X\'s '
                      f'default) reads seqio\'s cache, and no cache directory ({dirs}) holds it. '
                      'Cache it with seqio\'s cache_tasks_main, name its cache directory with '
                      '--seqio_additional_cache_dirs, or set USE_CACHED_TASKS = False')


def max_feature_lengths(config: DatasetConfig, num_examples: int | None = None,
                        evaluated_only: bool = False) -> dict[str, int]:
  """The longest of each feature of ``config``'s split (the first ``num_examples`` of each task
  with the split; with ``evaluated_only``, of each task seqio's Evaluator evaluates), read
  without trimming: T5X's ``TASK_FEATURE_LENGTHS = None``, measured as seqio's Evaluator
  measures it. ``config.task_feature_lengths`` when it is set."""
  if config.task_feature_lengths is not None:
    return dict(config.task_feature_lengths)
  task = task_for(config)
  check_split(config, task)
  subtasks = [t for t in seqio.get_subtasks(task) if config.split in t.splits]
  if evaluated_only:
    from seqio import evaluation  # pylint: disable=g-import-not-at-top
    subtasks = evaluation.get_valid_eval_tasks(subtasks, config.split)
  lengths: dict[str, int] = {}
  for subtask in subtasks:
    try:
      dataset = subtask.get_dataset(None, split=config.split, shuffle=False, num_epochs=1,
                                    use_cached=config.use_cached, seed=config.seed)
    except (ValueError, TypeError) as e:
      raise UserError(f'TASK_FEATURE_LENGTHS = None needs task {subtask.name!r} to read its '
                      f'examples without lengths, and it cannot ({_first_line(e)}); set '
                      'TASK_FEATURE_LENGTHS') from None
    if num_examples is not None:
      dataset = dataset.take(num_examples)
    features = [name for name in subtask.output_features]
    with record_errors_as_user_errors():
      for example in dataset.as_numpy_iterator():
        for name in features:
          if name in example and np.ndim(example[name]) > 0:
            lengths[name] = max(lengths.get(name, 0), int(np.shape(example[name])[0]))
  if not lengths:
    which = 'task with metric functions' if evaluated_only else 'task'
    raise UserError(f'TASK_FEATURE_LENGTHS = None: no {which} of '
                    f'{config.mixture_or_task_name!r} has examples in its {config.split!r} '
                    'split to measure')
  return lengths


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_split(config: DatasetConfig, task: seqio.Task | seqio.Mixture | None = None) -> None:
  """A UserError unless the task or mixture of ``config`` has ``config.split``."""
  task = task or task_for(config)
  if config.split not in task.splits:
    files_hint = (' (file tasks: set TRAIN_FILES / VALIDATION_FILES)'
                  if config.split in (file_tasks.TRAIN, file_tasks.VALIDATION) else '')
    raise UserError(f'{config.mixture_or_task_name!r} has no split {config.split!r}; '
                    f'it has {sorted(task.splits)}{files_hint}')


def _readable(vocabulary: Any, whose: str) -> None:
  """A UserError naming the file when a vocabulary cannot be loaded (e.g. gs:// offline)."""
  try:
    _ = vocabulary.vocab_size  # loads it
  except Exception as error:  # pylint: disable=broad-except  (any reader's failure)
    source = getattr(vocabulary, 'sentencepiece_model_file', type(vocabulary).__name__)
    raise UserError(f'cannot read {whose} vocabulary {source}: {_first_line(error)} (bind '
                    'seqio.SentencePieceVocabulary.sentencepiece_model_file to a readable '
                    'file)') from error


def check_vocabularies(model: Any, config: DatasetConfig | None = None,
                       task: seqio.Task | seqio.Mixture | None = None) -> None:
  """A UserError if the model's vocabularies cannot be read or, with a task, if the task
  encodes its inputs or targets with other vocabularies than the model's (T5X's
  ``verify_matching_vocabs``): decodes would be read with the wrong vocabulary."""
  wanted = {'inputs': model.input_vocabulary, 'targets': model.output_vocabulary}
  for feature, vocabulary in wanted.items():
    if isinstance(vocabulary, seqio.Vocabulary):
      _readable(vocabulary, f"the model's {feature}")
  if config is None or not config.mixture_or_task_name:
    return
  task = task or task_for(config)
  for feature, vocabulary in wanted.items():
    spec = task.output_features.get(feature)
    if spec is None or not isinstance(vocabulary, seqio.Vocabulary):
      continue
    _readable(spec.vocabulary, f"the task's {feature}")
    if spec.vocabulary != vocabulary:
      raise UserError(f'{config.mixture_or_task_name!r} encodes {feature} with '
                      f'{_describe(spec.vocabulary)} but the model reads them with '
                      f'{_describe(vocabulary)}: bind the model\'s vocabulary (VOCABULARY) to '
                      "the task's")


def _describe(vocabulary: Any) -> str:
  source = getattr(vocabulary, 'sentencepiece_model_file', None)
  name = type(vocabulary).__name__
  return f'{name}({source})' if source else f'{name} of {vocabulary.vocab_size} ids'


def check_features(config: DatasetConfig, feature_converter_cls: type,
                   task: seqio.Task | seqio.Mixture | None = None) -> None:
  """A UserError unless the feature converter reads every feature it needs from the task and
  drops none of its inputs (a model of the wrong kind for the task)."""
  if config.task_feature_lengths is None:
    raise UserError(f'TASK_FEATURE_LENGTHS = None (the longest in the data) is for eval and '
                    f'infer; reading {config.mixture_or_task_name!r} in batches for training '
                    'needs lengths, e.g. {\'inputs\': 512, \'targets\': 128}')
  task = task or task_for(config)
  converter = f'seqio.{feature_converter_cls.__name__}'
  have = set(task.output_features)
  if issubclass(feature_converter_cls, seqio.DecoderFeatureConverter):
    reads = {'targets'} | (set(config.task_feature_lengths) & {'inputs'})
  else:
    reads = set(feature_converter_cls.TASK_FEATURES)
  described = f'{converter} reads {sorted(reads)} and {config.mixture_or_task_name!r} has ' \
              f'{sorted(have)}'
  if reads - have:
    hint = (': a targets-only task trains a decoder-only model (gin/models/decoder_only/)'
            if reads - have == {'inputs'} else '')
    raise UserError(f'{described}, without {sorted(reads - have)}{hint}')
  if 'inputs' in have and 'inputs' not in reads:
    hint = ("give TASK_FEATURE_LENGTHS an 'inputs' length to train a prefix LM"
            if issubclass(feature_converter_cls, seqio.DecoderFeatureConverter) else
            'use seqio.DecoderFeatureConverter to train a prefix LM on inputs and targets')
    raise UserError(f"{described}: its 'inputs' would be dropped; {hint}")


def get_dataset(config: DatasetConfig, feature_converter_cls: type, num_epochs: int | None = None,
                shard_id: int = 0, num_shards: int = 1, skip_rows: int = 0) -> tf.data.Dataset:
  """This host's share of the batched, feature-converted dataset.

  ``skip_rows`` leaves out the first rows of this host's stream (the converted, packed
  examples, before batching), so that a stream of another batch size continues where
  one stopped. The rows are read to be skipped: a deterministic stream (a seed) gives
  the same rows after them as without the skip.
  """
  task = task_for(config)
  if config.batch_size % num_shards:
    raise UserError(f'BATCH_SIZE {config.batch_size} is not divisible by the {num_shards} data '
                    'shards (hosts)')
  check_split(config, task)
  check_features(config, feature_converter_cls, task)
  # seqio.get_dataset batches last (drop_remainder), so unbatched + batch is its own pipeline:
  # an iterator saved from a pipeline without a skip restores into one without a skip.
  dataset = seqio.get_dataset(
      task, dict(config.task_feature_lengths), feature_converter_cls(pack=config.pack),
      dataset_split=config.split, use_cached=config.use_cached, shuffle=config.shuffle,
      num_epochs=num_epochs, shard_info=seqio.ShardInfo(shard_id, num_shards),
      seed=config.seed, batch_size=None)
  if skip_rows:
    dataset = dataset.skip(skip_rows)
  dataset = dataset.batch(config.batch_size // num_shards, drop_remainder=True)
  # Packing and batching the next batches while a step runs, not when the loop asks for one.
  dataset = dataset.prefetch(_PREFETCH_BATCHES)
  # The file tasks parse lines in Python (tf.py_function); parsing keeps no state, so a
  # checkpoint of the iterator (file positions, shuffle buffers) is complete without it.
  options = tf.data.Options()
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return dataset.with_options(options)


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where one host's training stream stands; saved as JSON next to its iterator.

  The stream is the rows ``get_dataset`` makes for this host before batching, from the
  settings below and the seed ``stream_seed``. ``seed`` is the configured seed
  (``DatasetConfig.seed``, else the run's random seed); ``stream_seed`` is the seed the
  stream was built with (the seed plus the step, after a fresh start at that step). The
  pipeline skipped ``start_row`` rows before batching ``host_batch_size`` rows at a time,
  and ``rows`` rows (``start_row`` included) had gone to training when it was saved.
  """

  mixture_or_task_name: str
  split: str
  task_feature_lengths: Mapping[str, int]
  pack: bool
  shuffle: bool
  use_cached: bool
  feature_converter: str
  seed: int
  stream_seed: int
  batch_size: int  # global
  host_batch_size: int
  shard_id: int
  num_shards: int
  start_row: int = 0
  rows: int = 0

  # The settings that make the stream itself (not how it is batched or how far it has got).
  STREAM_FIELDS = ('mixture_or_task_name', 'split', 'task_feature_lengths', 'pack', 'shuffle',
                   'use_cached', 'feature_converter', 'seed')

  @classmethod
  def of(cls, config: DatasetConfig, feature_converter_cls: type, seed: int, stream_seed: int,
         shard_id: int, num_shards: int, start_row: int = 0) -> 'DataPosition':
    """The position of a stream of ``config`` that starts at row ``start_row``."""
    return cls(config.mixture_or_task_name, config.split, dict(config.task_feature_lengths),
               config.pack, config.shuffle, config.use_cached, feature_converter_cls.__name__,
               seed, stream_seed, config.batch_size, config.batch_size // num_shards, shard_id,
               num_shards, start_row, start_row)

  def stream_differences(self, other: 'DataPosition') -> list[str]:
    """``<field> <self's value> then, <other's> now`` for each setting of the stream that
    differs (``self`` is the saved position)."""
    return [f'{name} {getattr(self, name)!r} then, {getattr(other, name)!r} now'
            for name in self.STREAM_FIELDS if getattr(self, name) != getattr(other, name)]

  def to_json(self) -> str:
    return json.dumps({'version': _POSITION_VERSION, **dataclasses.asdict(self)}, indent=2,
                      sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'DataPosition':
    fields = json.loads(text)
    version = fields.pop('version', None)
    if version != _POSITION_VERSION:
      raise ValueError(f'data position version {version!r}, not {_POSITION_VERSION}')
    return cls(**fields)


_POSITION_VERSION = 1


@contextlib.contextmanager
def record_errors_as_user_errors() -> Iterator[None]:
  """A bad record of a user's file, met while tf.data reads, becomes one ``path:line`` UserError."""
  try:
    yield
  except tf.errors.OpError as e:
    message = file_tasks.record_error_message(e)
    if message is None:
      raise
    raise UserError(message) from None


class BatchIterator:
  """Host-local batches of a tf.data dataset as global jax.Arrays of ``global_batch_size`` rows.

  ``iterator`` is the underlying tf.data iterator; its position (shuffle and
  prefetch buffers included) is what ``DatasetIteratorArgs`` saves and restores.
  With ``position`` (the stream's, when the iterator is new or restored), the iterator
  counts the rows it reads and ``position()`` says where the stream stands.
  """

  def __init__(self, dataset: tf.data.Dataset, sharding: jax.sharding.Sharding,
               global_batch_size: int, position: DataPosition | None = None):
    self.iterator = iter(dataset)
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    self._position = position
    self._rows = position.rows if position is not None else 0
    self._pending: Any = None  # a batch read ahead by ``check_restored``

  def __iter__(self) -> 'BatchIterator':
    return self

  def position(self) -> DataPosition | None:
    """The stream's position after the batches read so far; None without a starting one."""
    if self._position is None:
      return None
    return dataclasses.replace(self._position, rows=self._rows)

  def _next_local(self) -> Any:
    with record_errors_as_user_errors():
      local = next(self.iterator)
    self._rows += int(next(iter(local.values())).shape[0])
    return local

  def check_restored(self, checkpoint: str, setting: str) -> None:
    """Reads the first batch of a restored iterator now: a UserError naming ``checkpoint`` and
    ``setting`` when the saved position does not fit this pipeline (batches of another shape)."""
    try:
      self._pending = self._next_local()
    except tf.errors.InvalidArgumentError as e:
      detail = re.sub(r'\{\{.*?\}\}\s*|\s*\[Op:.*', '', e.message, flags=re.S)
      detail = ' '.join(detail.split()).rstrip('.')
      raise UserError(f'the data position saved in {checkpoint} does not fit this run\'s data '
                      f'pipeline ({detail}): the batch size or the feature lengths differ from '
                      f'the run that saved it; set {setting} to start the data afresh') from None

  def __next__(self) -> dict[str, jax.Array]:
    local, self._pending = self._pending, None
    if local is None:
      local = self._next_local()
    return {name: jax.make_array_from_process_local_data(
                self._sharding, value.numpy(), (self._global_batch_size,) + tuple(value.shape[1:]))
            for name, value in local.items()}


def data_scalars() -> dict[str, float]:
  """Counters of the input pipeline for TensorBoard: records skipped as bad, by split."""
  return {f'data/skipped_records/{split}': float(count)
          for split, count in file_tasks.skipped_records().items()}


def _iterator_file(directory: Any) -> str:
  """This process's file in a checkpoint's dataset item: one per process, as T5X does."""
  return os.path.join(str(directory), f'process_{jax.process_index()}-of-{jax.process_count()}')


def has_saved_iterator(item_dir: str) -> bool:
  """Whether ``item_dir`` (a checkpoint's dataset item) holds this process's iterator."""
  return tf.io.gfile.exists(_iterator_file(item_dir) + '.index')


def saved_position(item_dir: str) -> DataPosition | None:
  """This process's data position in ``item_dir`` (a checkpoint's dataset item); None when the
  checkpoint has none (written before positions were recorded, or by a resume of such one)."""
  path = _iterator_file(item_dir) + '.json'
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    return DataPosition.from_json(text)
  except (ValueError, TypeError) as e:
    raise UserError(f'{path} is damaged: {e}') from None


class DatasetIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores each process's tf.data iterator as a TensorFlow checkpoint file, and
  writes its data position (``DataPosition``) next to it as JSON."""

  def save(self, directory: Any, args: 'DatasetIteratorArgs') -> None:
    path = _iterator_file(directory)
    tf.train.Checkpoint(iterator=args.iterator).write(path)
    position = args.position() if args.position is not None else None
    if position is not None:
      with tf.io.gfile.GFile(path + '.json', 'w') as f:
        f.write(position.to_json())

  def restore(self, directory: Any, args: 'DatasetIteratorArgs') -> Any:
    path = _iterator_file(directory)
    if not tf.io.gfile.exists(path + '.index'):
      raise UserError(f'{directory} has no data iterator for process {jax.process_index()} of '
                      f'{jax.process_count()}')
    tf.train.Checkpoint(iterator=args.iterator).read(path).assert_consumed()
    return args.iterator


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorArgs(ocp.args.CheckpointArgs):
  """Orbax arguments for the data iterator item of a checkpoint; ``position`` (on saves) gives
  the stream's position at the moment of the save."""

  iterator: Any
  position: Callable[[], DataPosition | None] | None = None


def subtask_names(config: DatasetConfig) -> list[str]:
  """The tasks that make up ``config``'s mixture (or the task itself), in seqio's order."""
  return [task.name for task in seqio.get_subtasks(task_for(config))]


def pretokenized_examples(config: DatasetConfig, num_examples: int | None = None,
                          shard_id: int = 0, num_shards: int = 1) -> list[dict[str, Any]]:
  """The first examples of a split (all with None), unbatched and unconverted (text and ids).

  With ``num_shards`` > 1, shard ``shard_id`` of them: every ``num_shards``-th example from
  the ``shard_id``-th (of the first ``num_examples``), so that the shards together hold the
  unsharded examples, each once. Without feature lengths the examples are not trimmed.
  """
  task = task_for(config)
  check_split(config, task)
  lengths = (dict(config.task_feature_lengths) if config.task_feature_lengths is not None
             else None)
  dataset = task.get_dataset(lengths, split=config.split, shuffle=False, num_epochs=1,
                             use_cached=config.use_cached)
  if num_examples is not None:
    dataset = dataset.take(num_examples)
  if num_shards > 1:
    dataset = dataset.shard(num_shards, shard_id)
  with record_errors_as_user_errors():
    return list(dataset.as_numpy_iterator())


def _file_records(path: str) -> list[tuple[str, str | None]]:
  """(input, target or None) per non-blank line of a data file (formats as in file_formats).

  Text files hold an input per line; JSONL files "inputs" and optionally "targets"; TSV and
  CSV files the input and optionally the target in their first two columns.
  """
  fmt = file_formats.file_format(path)
  records = []
  with tf.io.gfile.GFile(path, 'rb') as f:
    for number, raw in enumerate(file_formats.open_lines(f, path), start=1):
      if not raw.strip():
        continue
      if fmt == file_formats.TEXT:
        records.append((file_formats.parse_line(raw, path, number, fmt, Columns(()))[0], None))
        continue
      both = Columns((file_formats.DEFAULT_INPUT_FIELD, file_formats.DEFAULT_TARGET_FIELD)
                     if fmt == file_formats.JSONL else (0, 1))
      try:
        records.append(file_formats.parse_line(raw, path, number, fmt, both))
      except file_formats.RecordError:  # no target: an input alone
        one = Columns(both.fields[:1])
        records.append((file_formats.parse_line(raw, path, number, fmt, one)[0], None))
  return records


def file_examples(path: str, input_vocabulary: seqio.Vocabulary,
                  output_vocabulary: seqio.Vocabulary,
                  task_feature_lengths: Mapping[str, int] | None,
                  num_examples: int | None = None, shard_id: int = 0,
                  num_shards: int = 1) -> list[dict[str, Any]]:
  """Examples from a text file, tokenized as T5 tasks do: trimmed (unless the lengths are
  None), then EOS appended; with ``num_shards`` > 1, every ``num_shards``-th from the
  ``shard_id``-th.

  Each example has ``inputs`` and ``inputs_pretokenized`` and, where the file gives
  targets (.tsv second column, .jsonl "targets"), ``targets`` and ``targets_pretokenized``.
  """
  if not tf.io.gfile.exists(path):
    raise UserError(f'input file {path!r} does not exist')
  def encode(vocabulary: seqio.Vocabulary, text: str, length: int | None) -> np.ndarray:
    ids = list(vocabulary.encode(text))
    ids = (ids if length is None else ids[:length - 1]) + [vocabulary.eos_id]
    return np.asarray(ids, np.int32)
  examples = []
  try:
    records = _file_records(path)
  except file_formats.RecordError as e:
    raise UserError(str(e)) from None
  lengths = task_feature_lengths or {}
  for inputs, targets in records[:num_examples][shard_id::num_shards]:
    example = {'inputs': encode(input_vocabulary, inputs, lengths.get('inputs')),
               'inputs_pretokenized': inputs}
    if targets is not None:
      example['targets'] = encode(output_vocabulary, str(targets), lengths.get('targets'))
      example['targets_pretokenized'] = str(targets)
    examples.append(example)
  if not examples and not records:
    raise UserError(f'input file {path!r} holds no examples')
  return examples


__all__ = ['DatasetConfig', 'get_dataset', 'task_for', 'get_mixture_or_task', 'check_vocabularies',
           'BatchIterator', 'DataPosition', 'DatasetIteratorArgs', 'has_saved_iterator',
           'saved_position', 'check_cached', 'max_feature_lengths',
           'pretokenized_examples', 'subtask_names', 'file_examples', 'tasks']
