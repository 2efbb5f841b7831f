"""seqio tasks over users' files, registered from gin: T5 span corruption on text, and pairs.

    MIXTURE_OR_TASK_NAME = @file_tasks.span_corruption_task()   # gin/tasks/span_corruption.gin
    MIXTURE_OR_TASK_NAME = @file_tasks.pairs_task()             # gin/tasks/files.gin

Each function checks the files (globs, headers, the first records) when gin calls it, before
anything is compiled or saved, registers a seqio task and returns its name. Lines are read by
tf.data (so a checkpoint holds each reader's position) and parsed by ``file_formats``. A bad
record stops the run with ``path:line: ...``, or is skipped and counted with
``skip_bad_records``.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from t5train import file_formats, span_corruption, text_metrics
from t5train.errors import UserError
from t5train.file_formats import Columns, RecordError

TRAIN, VALIDATION = 'train', 'validation'
_PARSE_BATCH = 256  # lines per call into Python
_CYCLE_LENGTH = 16  # files read at once
_FIRST_RECORDS_CHECKED = 10  # per file, when the task is registered
_SKIPPED: collections.Counter[str] = collections.Counter()  # split -> records skipped
_SKIPS_LOGGED = 20  # skipped records named in the log, per process
_TOKENIZE_BATCH = 256  # records per SentencePiece call


def tokenize_in_batches(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                        copy_pretokenized: bool = True, unbatch: bool = True) -> tf.data.Dataset:
  """``seqio.preprocessors.tokenize`` (same ids, same ``*_pretokenized`` copies) with one
  SentencePiece call per batch of records instead of per record: lines of text are short, and
  the per-record cost of a tf.data map was most of the tokenizing. ``unbatch=False`` leaves the
  records in those batches (ragged token ids), for a preprocessor that takes batches. Other
  vocabularies (bytes) encode one string at a time, so they go through seqio's own."""
  keys = [key for key in output_features if key in dataset.element_spec]
  if not all(isinstance(output_features[key].vocabulary, seqio.SentencePieceVocabulary)
             for key in keys):
    tokenized = seqio.preprocessors.tokenize(dataset, output_features,
                                             copy_pretokenized=copy_pretokenized)
    return tokenized if unbatch else tokenized.ragged_batch(_TOKENIZE_BATCH)

  def encode(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    encoded = dict(batch)
    for key in keys:
      if copy_pretokenized:
        encoded[f'{key}_pretokenized'] = batch[key]
      encoded[key] = output_features[key].vocabulary.encode_tf(batch[key])
    return encoded

  tokenized = dataset.batch(_TOKENIZE_BATCH).map(encode, num_parallel_calls=tf.data.AUTOTUNE)
  return tokenized.unbatch() if unbatch else tokenized


def skipped_records() -> dict[str, int]:
  """Records skipped so far in this process (with ``skip_bad_records``), by split."""
  return dict(_SKIPPED)


def record_error_message(error: BaseException) -> str | None:
  """The ``path:line: ...`` line of a bad record inside a tf.data error, or None."""
  match = re.search(r'RecordError: ([^\n]*)', str(error))
  return match.group(1) if match else None


class FilesDataSource(seqio.DataSource):
  """Records of text files by split: the named fields of each line as strings.

  Hosts read disjoint files, or disjoint lines of every file when there are fewer files
  than hosts. Training shuffles the file order each epoch; seqio shuffles the examples.
  """

  def __init__(self, split_files: Mapping[str, Sequence[str]], keys: Sequence[str],
               fields: Sequence[str | int], skip_bad_records: bool = False):
    self._files = {split: list(files) for split, files in split_files.items() if files}
    self._keys = tuple(keys)
    self._skip_bad_records = skip_bad_records
    self._columns = {path: _checked_columns(path, fields, skip_bad_records)
                     for files in self._files.values() for path in files}
    super().__init__(splits=tuple(self._files), num_input_examples=None)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return self._files[split]

  def get_dataset(self, split: str = TRAIN, shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # seqio repeats after the source
    files = self._files[split]
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    line_shards = 1
    if count > 1 and len(files) >= count:
      files = files[index::count]
    elif count > 1:
      line_shards = count
    headers = [int(self._columns[path].has_header) for path in files]
    paths = tf.data.Dataset.from_tensor_slices((files, headers))
    if shuffle:
      paths = paths.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    read = functools.partial(self._file_records, split=split, line_shards=line_shards,
                             line_shard=index)
    # Files take turns a batch of lines at a time: per line, interleaving cost more than parsing.
    batches = paths.interleave(read, cycle_length=min(len(files), _CYCLE_LENGTH),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.unbatch()

  def _file_records(self, path: tf.Tensor, header_lines: tf.Tensor, *, split: str,
                    line_shards: int, line_shard: int) -> tf.data.Dataset:
    """The records of one file in batches (of up to _PARSE_BATCH lines, less the blank ones)."""
    compression = tf.where(tf.strings.regex_full_match(path, r'.*\.gz'), 'GZIP', '')
    lines = tf.data.TextLineDataset(path, compression_type=compression)
    lines = lines.skip(tf.cast(header_lines, tf.int64)).enumerate(
        start=tf.cast(header_lines, tf.int64) + 1)
    if line_shards > 1:
      lines = lines.shard(line_shards, line_shard)
    # A last empty batch checks a .gz file's end: TensorFlow reads a cut-short one in silence.
    batches = lines.batch(_PARSE_BATCH).concatenate(
        tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0], tf.string))))
    parse = functools.partial(self._parse, split=split)
    keys = self._keys

    def parsed(numbers: tf.Tensor, raw: tf.Tensor) -> dict[str, tf.Tensor]:
      fields = tf.py_function(parse, [path, numbers, raw], [tf.string] * len(keys))
      return {key: tf.ensure_shape(field, [None]) for key, field in zip(keys, fields)}

    return batches.map(parsed)

  def _parse(self, path: tf.Tensor, numbers: tf.Tensor, raw: tf.Tensor, split: str
             ) -> list[np.ndarray]:
    """The fields of the records in a batch of lines: blank lines and skipped records left out."""
    name = path.numpy().decode('utf-8')
    columns = self._columns[name]
    fmt = file_formats.file_format(name)
    rows = []
    for number, line in zip(numbers.numpy().tolist(), raw.numpy().tolist()):
      if not line.strip():
        continue
      try:
        rows.append(file_formats.parse_line(line, name, number, fmt, columns))
      except RecordError as e:
        self._skip_or_raise(e, split)
    if not len(raw.numpy()) and file_formats.is_gzip(name):
      try:
        file_formats.check_gzip_end(name, tf.io.gfile.GFile)
      except RecordError as e:
        self._skip_or_raise(e, split)
    return [np.array([row[i] for row in rows], dtype=object).reshape(-1)
            for i in range(len(self._keys))]

  def _skip_or_raise(self, error: RecordError, split: str) -> None:
    if not self._skip_bad_records:
      raise error
    _SKIPPED[split] += 1
    if sum(_SKIPPED.values()) <= _SKIPS_LOGGED:
      logging.warning('Skipped a bad record: %s', error)


def _checked_columns(path: str, fields: Sequence[str | int], skip_bad_records: bool) -> Columns:
  """The columns of ``path``'s fields, after reading its first records (errors: UserError)."""
  fmt = file_formats.file_format(path)
  first_lines = []
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      for number, line in enumerate(file_formats.open_lines(f, path), start=1):
        first_lines.append((number, line))
        if len(first_lines) > _FIRST_RECORDS_CHECKED:
          break
  except RecordError as e:
    if not skip_bad_records:
      raise UserError(str(e)) from None
  except (OSError, tf.errors.OpError) as e:
    raise UserError(f'{path}: cannot read ({e})') from None
  if not any(line.strip() for _, line in first_lines):
    raise UserError(f'{path}: the file is empty')
  first = first_lines[0][1].decode('utf-8', 'replace').rstrip('\r\n')
  columns = file_formats.resolve_columns(path, fmt, fields, first)
  for number, line in first_lines[int(columns.has_header):]:
    if not line.strip():
      continue
    try:
      file_formats.parse_line(line, path, number, fmt, columns)
    except RecordError as e:
      if not skip_bad_records:
        raise UserError(str(e)) from None
  return columns


def _split_files(train_files: str | Sequence[str] | None,
                 validation_files: str | Sequence[str] | None) -> dict[str, list[str]]:
  split_files = {}
  for split, patterns, macro in ((TRAIN, train_files, 'TRAIN_FILES'),
                                 (VALIDATION, validation_files, 'VALIDATION_FILES')):
    if file_formats.as_patterns(patterns):
      split_files[split] = file_formats.expand_patterns(patterns, tf.io.gfile.glob, macro)
  if not split_files:
    raise UserError('no data files: set TRAIN_FILES (training) or VALIDATION_FILES (evaluation)')
  return split_files


def _check_formats(split_files: Mapping[str, list[str]], allowed: Sequence[str], task: str) -> None:
  for files in split_files.values():
    for path in files:
      if file_formats.file_format(path) not in allowed:
        raise UserError(f'{path}: {task} reads {", ".join(allowed)} files, not '
                        f'{file_formats.file_format(path)} (told by the file name)')


@functools.cache
def _files_source(split_files: tuple[tuple[str, tuple[str, ...]], ...], keys: tuple[str, ...],
                  fields: tuple[str | int, ...], skip_bad_records: bool) -> FilesDataSource:
  """One source per set of files and fields: gin calls the task functions once per reference."""
  return FilesDataSource(dict(split_files), keys, fields, skip_bad_records)


def _source(split_files: Mapping[str, list[str]], keys: tuple[str, ...],
            fields: tuple[str | int, ...], skip_bad_records: bool) -> FilesDataSource:
  frozen = tuple((split, tuple(files)) for split, files in split_files.items())
  return _files_source(frozen, keys, fields, skip_bad_records)


def _register(name: str, source: seqio.DataSource, preprocessors: list, vocabulary: seqio.Vocabulary,
              metric_fns: list) -> str:
  """Registers task ``name``, replacing an earlier registration of the name."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  features = {'inputs': seqio.Feature(vocabulary, add_eos=True, required=False),
              'targets': seqio.Feature(vocabulary, add_eos=True)}
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=features, metric_fns=metric_fns)
  return name


def _span_corruption_task(name: str, train_files: tuple[str, ...] | None,
                          validation_files: tuple[str, ...] | None, text_field: str,
                          vocabulary: seqio.Vocabulary, noise_density: float,
                          mean_noise_span_length: float, skip_bad_records: bool) -> str:
  split_files = _split_files(train_files, validation_files)
  _check_formats(split_files, (file_formats.TEXT, file_formats.JSONL), 'span corruption')
  source = _source(split_files, ('targets',), (text_field,), skip_bad_records)
  # Documents go from tokenizing to span corruption in batches: only the token ids go on (span
  # corruption makes new texts of them). With no cache step between them, nothing stores the
  # batches as if they were examples.
  tokenize = functools.partial(tokenize_in_batches, copy_pretokenized=False, unbatch=False)
  noising = functools.partial(span_corruption.span_corruption, noise_density=noise_density,
                              mean_noise_span_length=mean_noise_span_length, batched=True)
  preprocessors = [tokenize, noising, seqio.preprocessors.append_eos_after_trim]
  return _register(name, source, preprocessors, vocabulary, metric_fns=[])


def _pairs_task(name: str, train_files: tuple[str, ...] | None,
                validation_files: tuple[str, ...] | None, input_field: str | int,
                target_field: str | int, vocabulary: seqio.Vocabulary, metrics: tuple[str, ...],
                skip_bad_records: bool) -> str:
  metric_fns = text_metrics.metric_fns(metrics)
  split_files = _split_files(train_files, validation_files)
  _check_formats(split_files, (file_formats.JSONL, file_formats.TSV, file_formats.CSV), 'pairs_task')
  source = _source(split_files, ('inputs', 'targets'), (input_field, target_field),
                   skip_bad_records)
  preprocessors = [tokenize_in_batches, seqio.CacheDatasetPlaceholder(),
                   seqio.preprocessors.append_eos_after_trim]
  return _register(name, source, preprocessors, vocabulary, metric_fns)


def _as_key(patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
  return tuple(file_formats.as_patterns(patterns)) or None


def span_corruption_task(*, train_files: str | Sequence[str] | None = None,
                         validation_files: str | Sequence[str] | None = None,
                         vocabulary: seqio.Vocabulary, name: str = 'span_corruption',
                         text_field: str = 'text', noise_density: float = 0.15,
                         mean_noise_span_length: float = 3.0, skip_bad_records: bool = False
                         ) -> str:
  """Registers T5's span-corruption pretraining on text or JSONL files; returns the task name.

  Each line of a text file is a document; a JSONL line's ``text_field`` is. Documents are
  tokenized, chunked, concatenated and split, then noised: ``noise_density`` of the tokens in
  spans of mean length ``mean_noise_span_length``, each replaced by a sentinel.
  """
  if not 0 < noise_density < 1:
    raise UserError(f'NOISE_DENSITY must be between 0 and 1, got {noise_density}')
  if mean_noise_span_length < 1:
    raise UserError(f'MEAN_NOISE_SPAN_LENGTH must be at least 1, got {mean_noise_span_length}')
  return _span_corruption_task(name, _as_key(train_files), _as_key(validation_files), text_field,
                               vocabulary, float(noise_density), float(mean_noise_span_length),
                               bool(skip_bad_records))


def pairs_task(*, train_files: str | Sequence[str] | None = None,
               validation_files: str | Sequence[str] | None = None,
               vocabulary: seqio.Vocabulary, name: str = 'files',
               input_field: str | int = file_formats.DEFAULT_INPUT_FIELD,
               target_field: str | int = file_formats.DEFAULT_TARGET_FIELD,
               metrics: Sequence[str] = ('exact_match',), skip_bad_records: bool = False) -> str:
  """Registers a task of (input, target) pairs from TSV, CSV or JSONL files; returns its name.

  ``metrics`` are names from ``text_metrics.METRICS``, computed on the validation split by
  evaluation during training, ``t5train.eval`` and ``InteractiveModel``.
  """
  return _pairs_task(name, _as_key(train_files), _as_key(validation_files), input_field,
                     target_field, vocabulary, tuple(metrics), bool(skip_bad_records))


def mixture(*, name: str, tasks: Sequence[str], rates: Sequence[float] | None = None) -> str:
  """Registers (or replaces) a mixture of registered tasks sampled by ``rates``; returns its name."""
  if not tasks:
    raise UserError(f'mixture {name!r} has no tasks')
  if rates is not None and len(rates) != len(tasks):
    raise UserError(f'mixture {name!r}: {len(tasks)} tasks but {len(rates)} rates')
  if rates is not None and (any(r < 0 for r in rates) or not sum(rates)):
    raise UserError(f'mixture {name!r}: rates must be >= 0 and not all 0, got {list(rates)}')
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  weighted = list(zip(tasks, rates)) if rates is not None else list(tasks)
  seqio.MixtureRegistry.add(name, weighted, default_rate=1.0)
  return name
