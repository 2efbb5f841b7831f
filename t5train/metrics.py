"""Training metrics over a window of steps, and the TensorBoard writer.

Per-step metrics stay on the device as clu metrics until a window is read,
so the train loop never waits for them. clu's metric writers (which import
TensorFlow) are loaded only when a summary directory is given.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from t5train import multihost

StepMetrics = Mapping[str, Any]  # name -> clu metric (device arrays)


class MetricsWindow:
  """Collects the metrics of consecutive steps and summarises them with timings."""

  def __init__(self, tokens_per_step: int = 0, seqs_per_step: int = 0,
               target_tokens_per_step: int = 0):
    self._tokens_per_step = tokens_per_step
    self._seqs_per_step = seqs_per_step
    self._target_tokens_per_step = target_tokens_per_step
    self.reset()

  def reset(self) -> None:
    self._steps: list[StepMetrics] = []
    self._start = time.perf_counter()

  @property
  def num_steps(self) -> int:
    return len(self._steps)

  def add(self, step_metrics: StepMetrics) -> None:
    self._steps.append(step_metrics)

  def elapsed_secs(self) -> float:
    return time.perf_counter() - self._start

  def summary(self) -> dict[str, float]:
    """Merged metrics of the window plus ``timing/*`` rates; waits for the device."""
    if not self._steps:
      return {}
    host = jax.device_get(self._steps)
    merged = {name: functools.reduce(lambda a, b: a.merge(b), [m[name] for m in host])
              for name in host[0]}
    result = {name: float(np.asarray(metric.compute())) for name, metric in merged.items()}
    elapsed = max(self.elapsed_secs(), 1e-9)
    steps_per_second = len(self._steps) / elapsed
    result['timing/steps_per_second'] = steps_per_second
    result['timing/seqs_per_second'] = steps_per_second * self._seqs_per_step
    result['timing/target_tokens_per_second'] = steps_per_second * self._target_tokens_per_step
    result['timing/tokens_per_second'] = steps_per_second * self._tokens_per_step
    return result


class SummaryWriter:
  """TensorBoard scalars under a directory, written by process 0 only."""

  def __init__(self, summary_dir: str | None):
    self._writer = None
    if summary_dir and multihost.is_primary():
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(summary_dir))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, dict(scalars))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
