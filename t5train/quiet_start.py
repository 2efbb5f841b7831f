"""A clean console on machines without a GPU: TensorFlow's start-up notes are dropped.

Importing TensorFlow prints lines such as ``failed call to cuInit: ... CUDA error`` and
``Could not find cuda drivers`` on every CPU-only machine. They say nothing useful, and they
look like failures to a new user. Some are written before TensorFlow's log level applies, so the
first ``import tensorflow`` runs with the process's stderr passed through a filter that drops
exactly those known lines and forwards every other line at once.

They stay visible with ``--verbosity=1`` (or ``-v=1``) on the command line, or when
``TF_CPP_MIN_LOG_LEVEL=0`` before start-up. Other values of that variable do not count: JAX sets
it to 1 when it is imported, so every child of a Python process that imported JAX (a test, a
notebook, a launcher) inherits a 1 that no one asked for.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

# Lines that TensorFlow and XLA print at start-up on a machine without a usable GPU.
STARTUP_NOISE = re.compile(
    r'All log messages before absl::InitializeLog\(\) is called are written to STDERR'
    r'|cudart_stub\.cc:\d+\] Could not find cuda drivers'
    r'|failed call to cuInit'
    r'|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized'
    r'|^To enable the following instructions: .* rebuild TensorFlow'
    r'|oneDNN custom operations are on'
    r'|Unable to register cu(?:DNN|FFT|BLAS) factory'
    r'|TF-TRT Warning: Could not find TensorRT')


def wants_startup_logs(argv: Sequence[str], environ: os._Environ | dict[str, str]) -> bool:
  """Whether the user asked to see the start-up notes (verbose flags or TF's own log level)."""
  for arg in argv:
    match = re.fullmatch(r'(?:--verbosity|-v)=(-?\d+)', arg)
    if match and int(match.group(1)) >= 1:
      return True
  return environ.get('TF_CPP_MIN_LOG_LEVEL', '').strip() == '0'


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str] = STARTUP_NOISE) -> Iterator[None]:
  """File descriptor 2 goes through a pipe; lines matching ``noise`` are dropped, the rest
  forwarded as they come (so nothing is held back if the process dies meanwhile)."""
  sys.stderr.flush()
  original = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def forward() -> None:
    with os.fdopen(read_end, 'rb') as pipe:
      for line in pipe:
        if not noise.search(line.decode('utf-8', 'replace')):
          os.write(original, line)

  thread = threading.Thread(target=forward, name='quiet_start', daemon=True)
  thread.start()
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(original, 2)  # closes the pipe's last write end: the thread reads to the end
    thread.join(timeout=10)
    os.close(original)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
  """Runs the first ``import tensorflow`` inside ``filtered_stderr``, then steps aside.

  Libraries probe for TensorFlow with ``importlib.util.find_spec`` long before importing it, so
  the finder leaves ``sys.meta_path`` only when the module is executed.
  """

  def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
    if name != 'tensorflow':
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    execute = spec.loader.exec_module

    def exec_module(module: Any) -> None:
      if self in sys.meta_path:
        sys.meta_path.remove(self)
      with filtered_stderr():
        execute(module)

    spec.loader.exec_module = exec_module
    return spec


def install() -> None:
  """Quiets TensorFlow's start-up unless the user asked for its logs or it is already loaded."""
  if 'tensorflow' in sys.modules or wants_startup_logs(sys.argv, os.environ):
    return
  os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'  # later notes too (e.g. cuInit on first use)
  if not any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
