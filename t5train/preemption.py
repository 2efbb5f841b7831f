"""Stop requests from signals, agreed on by every process.

The first SIGTERM or SIGINT asks training to stop after the current step (and
save a checkpoint); a second one exits at once without saving.
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


class StopRequest:
  """Installs signal handlers while active; ``requested()`` says whether to stop now."""

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[int, object] = {}
    self.received: int | None = None

  def __enter__(self) -> 'StopRequest':
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

  def requested(self) -> bool:
    """Whether any process has been asked to stop (all processes get the same answer)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))
