"""``jax.profiler`` traces of a range of steps (``PROFILE_STEPS``) or batches (infer's
``PROFILE_BATCHES``), written where TensorBoard's profile plugin (xprof) finds them.

``RangeProfiler(first, last, log_dir)`` starts a trace before item ``first`` and stops it
after item ``last`` has finished on the device, into ``log_dir/plugins/profile/<time>/``
(``*.xplane.pb`` for TensorBoard's profile plugin and xprof, and ``*.trace.json.gz`` for
Perfetto). Only the primary process traces unless ``all_processes``. This module is an edge:
the binaries hand a profiler to the loops as a step hook; nothing below imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from t5train import multihost, paths
from t5train.errors import UserError


def parse_range(value: Sequence[int] | None, setting: str) -> tuple[int, int] | None:
  """``(first, last)`` from a gin value such as ``(100, 105)``, or None; a UserError naming
  ``setting`` for anything else."""
  if value is None:
    return None
  try:
    first, last = (int(item) for item in value)
  except (TypeError, ValueError):
    raise UserError(f'{setting} must be (first, last), two numbers, e.g. (100, 105); got '
                    f'{value!r}') from None
  if not 1 <= first <= last:
    raise UserError(f'{setting} must be (first, last) with 1 <= first <= last; got {value!r}')
  return first, last


class RangeProfiler:
  """Traces items ``first`` to ``last`` (steps or batches, counted from 1) into ``log_dir``.

  The loop calls ``before(item)`` before it dispatches an item and ``after(item, outputs)``
  once it has; the trace stops only when ``outputs`` are ready, so it holds the device's
  work of the last item. ``close()`` stops a trace that a loop left open (an error, a stop
  signal, a range past the last step).
  """

  def __init__(self, first: int, last: int, log_dir: str, all_processes: bool = False):
    self.first, self.last = first, last
    self._log_dir = paths.resolve(log_dir) if not paths.is_url(log_dir) else log_dir
    self._enabled = all_processes or multihost.is_primary()
    self._tracing = False

  @property
  def trace_dir(self) -> str:
    """Where the traces go (``<log_dir>/plugins/profile``)."""
    return paths.join(str(self._log_dir), 'plugins', 'profile')

  def before(self, item: int) -> None:
    if self._enabled and not self._tracing and self.first <= item <= self.last:
      logging.info('Profiling %d to %d into %s.', item, self.last, self.trace_dir)
      jax.profiler.start_trace(str(self._log_dir), create_perfetto_trace=True)
      self._tracing = True

  def after(self, item: int, outputs: Any = None) -> None:
    if self._tracing and item >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self._tracing:
      self._tracing = False
      jax.profiler.stop_trace()
      logging.info('Wrote the profile to %s.', self.trace_dir)
