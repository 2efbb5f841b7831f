"""Stop requests from signals, agreed on by every process.

The first SIGTERM or SIGINT asks training to stop after the current step (and
save a checkpoint); a second one exits at once without saving. Processes agree
every ``sync_period`` steps (one small all-gather then, none in between), so a
multi-host run stops within that many steps of the signal. ``catch_early_signals``
makes a signal that arrives while the binary is still starting (restoring,
compiling, building the data pipeline) a stop request too, instead of death.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early_signal: int | None = None  # received before a StopRequest was active


def _remember_early_signal(signum: int, frame: FrameType | None) -> None:
  del frame
  global _early_signal
  name = signal.Signals(signum).name
  if _early_signal is not None:
    logging.error('Received a second signal (%s) while starting: exiting now.', name)
    logging.flush()
    os._exit(128 + signum)
  _early_signal = signum
  logging.warning('Received %s while starting: the run stops as soon as it is safe, without '
                  'training further. Send it again to exit at once.', name)


def catch_early_signals(signals: Sequence[int] = STOP_SIGNALS) -> None:
  """From now on a stop signal is remembered until a StopRequest takes it over."""
  if threading.current_thread() is threading.main_thread():
    for signum in signals:
      signal.signal(signum, _remember_early_signal)


class StopRequest:
  """Installs signal handlers while active; ``requested(step)`` says whether to stop now."""

  def __init__(self, signals: Sequence[int] = STOP_SIGNALS, sync_period: int = 10):
    if sync_period < 1:
      raise ValueError(f'sync_period must be at least 1, got {sync_period}')
    self._signals = tuple(signals)
    self._sync_period = sync_period
    self._previous: dict[int, object] = {}
    self.received: int | None = None

  def __enter__(self) -> 'StopRequest':
    global _early_signal
    self.received, _early_signal = _early_signal, None
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
      for signum in self._signals:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, exc_type: type | None, exc: BaseException | None,
               traceback: TracebackType | None) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      logging.error('Received a second signal (%s): exiting now, without saving.', name)
      logging.flush()
      os._exit(128 + signum)
    self.received = signum
    logging.warning('Received %s: finishing the current step, then saving a checkpoint and '
                    'exiting. Send it again to exit at once.', name)

  @property
  def signal_name(self) -> str | None:
    return None if self.received is None else signal.Signals(self.received).name

  def requested(self, step: int | None = None) -> bool:
    """Whether any process has been asked to stop; all processes get the same answer.

    With several processes they compare notes only at steps that are multiples of
    ``sync_period`` (and whenever ``step`` is None), and the answer is False in between.
    """
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    if step is not None and step % self._sync_period:
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))
