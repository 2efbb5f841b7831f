"""Paths on every store that ``etils.epath`` reaches (local folders, ``gs://`` buckets).

Orbax reads and writes through ``etils.epath`` too, so checkpoints, summaries and the binaries'
own files take the same kind of path. Local paths are made absolute; URLs are left as they are.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """Whether ``path`` names an object store (``gs://bucket/...``) rather than a local file."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """``path`` as an epath.Path: absolute if local, unchanged if a URL."""
  text = os.fspath(path)
  return epath.Path(text if is_url(text) else os.path.abspath(text))


def join(path: PathLike, *names: str) -> str:
  """``path/name/...`` as a string, for local paths and URLs alike."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*names))


def write_bytes_atomically(path: PathLike, data: bytes) -> None:
  """Readers see the whole file or none of it.

  Locally a temporary file is renamed into place (and removed if writing fails). An object
  store makes an upload visible only when it is complete, so there the object is written once,
  directly.
  """
  target = resolve(path)
  if is_url(target):
    target.write_bytes(data)
    return
  partial = target.with_name(f'{target.name}.tmp-{os.getpid()}')
  try:
    partial.write_bytes(data)
    partial.replace(target)
  finally:
    if partial.exists():
      partial.unlink()


def write_text_atomically(path: PathLike, text: str) -> None:
  """``write_bytes_atomically`` of ``text`` in UTF-8."""
  write_bytes_atomically(path, text.encode('utf-8'))


@contextlib.contextmanager
def staged_directory(output: PathLike) -> Iterator[str]:
  """A directory to fill that becomes ``output`` only if the block succeeds.

  Locally it is a temporary sibling renamed into place. Object stores have no directory
  rename, so there the block writes into ``output`` itself (write once, then commit): the caller
  writes its marker file last, and a failed block leaves nothing behind.
  """
  target = resolve(output)
  if target.exists():
    raise FileExistsError(f'{target} already exists')
  if is_url(target):
    try:
      yield os.fspath(target)
    except BaseException:
      if target.exists():
        target.rmtree()
      raise
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = epath.Path(tempfile.mkdtemp(prefix=target.name + '.tmp-', dir=target.parent))
  try:
    yield os.fspath(staging)
    staging.rename(target)
  finally:
    if staging.exists():
      staging.rmtree()
