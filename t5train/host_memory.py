"""How the C allocator (glibc malloc) hands host memory to XLA on CPU.

An XLA:CPU train step allocates several hundred megabytes of scratch space per
call; glibc maps such blocks afresh each time, so every step faults in and zeroes
them again in 4 KiB pages (a tenth of a small T5's step on 2 cores). With glibc's
``glibc.malloc.hugetlb=1`` tunable those blocks use transparent huge pages
instead. Tunables are read when a process starts, so the binaries restart
themselves once with it (``restart_with_huge_pages``).

``release_freed_memory`` hands freed pages back to the system: compilation frees
hundreds of megabytes in many small pieces, and the step's buffers are then laid
out beside them rather than in them, which would raise the process's peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_TUNABLES = 'GLIBC_TUNABLES'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# Modules whose presence makes JAX choose an accelerator over the CPU.
_ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


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


def jax_will_run_on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX will pick its CPU backend, decided without starting any backend."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def _huge_pages_available() -> bool:
  """glibc can ask for transparent huge pages, and the kernel grants them on request."""
  if platform.libc_ver()[0] != 'glibc':
    return False
  try:
    with open(_THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def environment_with_huge_pages(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
  """``environ`` plus the huge-page tunable; None where it is set already or cannot apply.

  A ``glibc.malloc.hugetlb`` setting the user chose is kept as it is.
  """
  tunables = environ.get(_TUNABLES, '')
  if 'glibc.malloc.hugetlb=' in tunables or not _huge_pages_available():
    return None
  return {**environ, _TUNABLES: ':'.join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))}


def restart_with_huge_pages() -> None:
  """Re-executes this process (same pid and arguments) with the huge-page tunable when
  JAX will run on the CPU; returns without doing anything otherwise."""
  environ = environment_with_huge_pages()
  if environ is None or not jax_will_run_on_cpu():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
