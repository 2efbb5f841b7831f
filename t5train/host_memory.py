"""Handing freed host memory back to the operating system, and the process's peak memory.

XLA compilation and the first steps free hundreds of megabytes in many small
pieces; glibc keeps them mapped, and a training step's large buffers are then
laid out beside them rather than in them, which raises the process's peak
memory. ``release_freed_memory`` asks the C allocator to return them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
  name = ctypes.util.find_library('c')
  try:
    trim = ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
    return None
  if trim is not None:
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


def release_freed_memory() -> bool:
  """Returns the allocator's free pages to the system; False where the C library cannot."""
  trim = _malloc_trim()
  return bool(trim is not None and trim(0) >= 0)


def peak_rss_bytes() -> int | None:
  """The most resident memory this process has held so far, in bytes; None where unknown."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  (POSIX only)
  except ImportError:
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports kibibytes, macOS bytes.
  return int(peak) if sys.platform == 'darwin' else int(peak) * 1024
