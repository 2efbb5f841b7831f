"""Users' data files: their format, the files a glob names, and the fields of one line.

Formats are told by the file name: ``.txt`` (and any unknown suffix) holds one document per
line, ``.jsonl`` / ``.json`` one JSON object per line, ``.tsv`` tab-separated and ``.csv``
comma-separated columns; each may end in ``.gz``. The vocabulary builder reads records through
this module and the file tasks parse their lines with it, so both accept the same files and name
a bad record the same way (``path:line: what is wrong``). No TensorFlow here: files are opened
with ``tf.io.gfile`` by the callers that need remote paths.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import IO

from t5train.errors import UserError

TEXT, JSONL, TSV, CSV = 'text', 'jsonl', 'tsv', 'csv'
_SUFFIXES = {'.txt': TEXT, '.text': TEXT, '.jsonl': JSONL, '.json': JSONL, '.tsv': TSV, '.csv': CSV}
DEFAULT_INPUT_FIELD, DEFAULT_TARGET_FIELD = 'inputs', 'targets'


class RecordError(ValueError):
  """One record (line) of a data file cannot be read; the message starts with ``path:line:``."""


def is_gzip(path: str) -> bool:
  return path.endswith('.gz')


def file_format(path: str) -> str:
  """TEXT, JSONL, TSV or CSV, from the name with any ``.gz`` removed (unknown suffixes: TEXT)."""
  name = path[:-3] if is_gzip(path) else path
  dot = name.rfind('.')
  return _SUFFIXES.get(name[dot:].lower(), TEXT) if dot > name.rfind('/') else TEXT


def as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
  """A glob or a list of globs as a list (commas separate globs in one string)."""
  if patterns is None:
    return []
  if isinstance(patterns, str):
    return [p.strip() for p in patterns.split(',') if p.strip()]
  return [str(p) for p in patterns]


def expand_patterns(patterns: str | Sequence[str], glob_fn: Callable[[str], list[str]],
                    what: str = 'files') -> list[str]:
  """The sorted files the globs match; a glob that matches nothing is a UserError."""
  files = []
  for pattern in as_patterns(patterns):
    matched = sorted(glob_fn(pattern))
    if not matched:
      raise UserError(f'{what}: {pattern!r} matches no file')
    files.extend(matched)
  if not files:
    raise UserError(f'{what}: no file given')
  return list(dict.fromkeys(files))  # each file once, in the order given


@dataclasses.dataclass(frozen=True)
class Columns:
  """Where a record's fields are: JSON keys (JSONL) or column indices (TSV, CSV)."""

  fields: tuple[str | int, ...]  # the text field, or the input then the target field
  has_header: bool = False  # TSV / CSV: the first line names the columns and is skipped


def split_columns(line: str, fmt: str) -> list[str]:
  """The columns of one TSV or CSV line (CSV quoting as Excel writes it)."""
  if fmt == TSV:
    return line.split('\t')
  return next(csv.reader([line], strict=True), [])


def resolve_columns(path: str, fmt: str, names: Sequence[str | int], first_line: str | None
                    ) -> Columns:
  """Which columns hold ``names`` in a file whose first line is ``first_line``.

  JSONL: the names are keys. TSV/CSV: integers are column indices; names are looked up in a
  header row (the first line) when it holds them all; with the default names and no header,
  the first columns in order.
  """
  if fmt == JSONL:
    return Columns(tuple(str(n) for n in names))
  if fmt == TEXT:
    return Columns(())
  if all(isinstance(n, int) for n in names):
    return Columns(tuple(names))
  header = [c.strip() for c in split_columns(first_line or '', fmt)]
  if all(str(n) in header for n in names):
    return Columns(tuple(header.index(str(n)) for n in names), has_header=True)
  defaults = (DEFAULT_INPUT_FIELD, DEFAULT_TARGET_FIELD)[:len(names)]
  if tuple(names) == defaults:
    return Columns(tuple(range(len(names))))
  raise UserError(f'{path}:1: the header row {header} has no column '
                  f'{", ".join(repr(str(n)) for n in names if str(n) not in header)}; name the '
                  'columns in a header row or give INPUT_FIELD / TARGET_FIELD as column numbers')


def parse_line(raw: bytes, path: str, number: int, fmt: str, columns: Columns) -> tuple[str, ...]:
  """The fields of line ``number`` of ``path``: the text alone (TEXT) or one per column."""
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise RecordError(f'{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})') from None
  line = line.rstrip('\r\n')
  if fmt == TEXT:
    return (line,)
  if fmt == JSONL:
    try:
      record = json.loads(line)
    except ValueError as e:
      raise RecordError(f'{path}:{number}: invalid JSON ({e})') from None
    if not isinstance(record, dict):
      raise RecordError(f'{path}:{number}: expected a JSON object, got {type(record).__name__}')
    missing = [name for name in columns.fields if name not in record]
    if missing:
      raise RecordError(f'{path}:{number}: no field {missing[0]!r} (fields: '
                        f'{", ".join(sorted(record))})')
    return tuple(_as_text(record[name], path, number, name) for name in columns.fields)
  try:
    values = split_columns(line, fmt)
  except csv.Error as e:
    raise RecordError(f'{path}:{number}: bad CSV ({e})') from None
  needed = max(columns.fields) + 1
  if len(values) < needed:
    separator = 'a TAB' if fmt == TSV else 'a comma'
    raise RecordError(f'{path}:{number}: {len(values)} column(s), expected {needed} separated by '
                      f'{separator}')
  return tuple(values[i] for i in columns.fields)


def _as_text(value: object, path: str, number: int, name: str | int) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float, bool)):
    return json.dumps(value)
  raise RecordError(f'{path}:{number}: field {name!r} is a {type(value).__name__}, not text')


def open_lines(raw_file: IO[bytes], path: str) -> Iterator[bytes]:
  """The lines of an opened file (decompressed when ``path`` ends in .gz), newlines kept.

  A gzip file cut short raises RecordError at its end, instead of ending early in silence.
  """
  stream = gzip.GzipFile(fileobj=raw_file, mode='rb') if is_gzip(path) else raw_file
  reader = io.BufferedReader(stream) if is_gzip(path) else stream  # type: ignore[arg-type]
  number = 0
  try:
    for number, line in enumerate(reader, start=1):  # noqa: B007
      yield line
  except (EOFError, gzip.BadGzipFile, OSError) as e:
    raise RecordError(f'{path}:{number + 1}: cannot read on ({e}); is the file cut short?') from None


def check_gzip_end(path: str, open_fn: Callable[[str, str], IO[bytes]]) -> None:
  """Raises RecordError unless every gzip member of ``path`` ends with its end-of-stream marker."""
  decompressor = zlib.decompressobj(wbits=31)
  with open_fn(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      while chunk:
        decompressor.decompress(chunk)
        chunk = decompressor.unused_data
        if decompressor.eof and chunk:  # another gzip member follows
          decompressor = zlib.decompressobj(wbits=31)
        elif decompressor.eof:
          chunk = b''
  if not decompressor.eof:
    raise RecordError(f'{path}: the gzip stream ends early; is the file cut short?')
