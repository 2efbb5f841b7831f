"""Training metrics over a window of steps, the TensorBoard writer, and memory figures.

Per-step metrics stay on the device as clu metrics until a window is read,
so the train loop never waits for them. TensorBoard scalars and texts in a local
folder are written with TensorBoard's own event records, without TensorFlow, whose
import alone adds about 0.55 GiB to a process; on a bucket, clu's writer (over
TensorFlow's file system) writes them.

A run's experiment trackers (W&B, MLflow: ``t5train.trackers``) are clu ``MetricWriter``s
that an entry point opens and registers here with ``forward_to_tracker``; every
``SummaryWriter`` under the registered directory then sends them what it writes, each tag
prefixed with the writer's folder (``train/loss``, ``training_eval/<task>/loss``). This layer
never imports a tracker.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from t5train import host_memory, multihost, paths

StepMetrics = Mapping[str, Any]  # name -> clu metric (device arrays)


# Where a training loop's wall time goes, besides running steps (see ``MetricsWindow.add_seconds``).
LOOP_PHASES = ('data', 'checkpoint', 'evaluation')


class MetricsWindow:
  """Collects the metrics of consecutive steps and summarises them with timings.

  The loop reports the seconds it spends waiting for data, saving checkpoints and
  evaluating; the summary gives each per step (``timing/<phase>_secs_per_step``)
  and the rest, dispatching and waiting for the steps themselves, as
  ``timing/compute_secs_per_step``.
  """

  def __init__(self, tokens_per_step: int = 0, seqs_per_step: int = 0,
               target_tokens_per_step: int = 0):
    self._tokens_per_step = tokens_per_step
    self._seqs_per_step = seqs_per_step
    self._target_tokens_per_step = target_tokens_per_step
    self.reset()

  def reset(self) -> None:
    self._steps: list[StepMetrics] = []
    self._seconds = dict.fromkeys(LOOP_PHASES, 0.0)
    self._start = time.perf_counter()

  @property
  def num_steps(self) -> int:
    return len(self._steps)

  def add(self, step_metrics: StepMetrics) -> None:
    self._steps.append(step_metrics)

  def add_seconds(self, phase: str, seconds: float) -> None:
    """Counts ``seconds`` of the window's wall time as spent in ``phase`` (one of LOOP_PHASES)."""
    self._seconds[phase] += seconds

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
    elapsed = self.elapsed_secs()
    # Evaluation is not training throughput; waiting for data and saving checkpoints are.
    result.update(timing_scalars(len(self._steps), elapsed - self._seconds['evaluation'],
                                 self._seqs_per_step, self._target_tokens_per_step))
    result['timing/tokens_per_second'] = result['timing/steps_per_second'] * self._tokens_per_step
    for phase, seconds in self._seconds.items():
      result[f'timing/{phase}_secs_per_step'] = seconds / len(self._steps)
    result['timing/compute_secs_per_step'] = (elapsed - sum(self._seconds.values())) / len(
        self._steps)
    return result


def timing_scalars(num_steps: int, seconds: float, seqs_per_step: int,
                   target_tokens_per_step: int) -> dict[str, float]:
  """T5X's ``timing/*`` summaries of ``num_steps`` steps that took ``seconds``.

  As T5X's ``compute_base_metrics`` defines them: ``seqs`` counts batch rows, target tokens
  are the target positions, padding included, and ``*_per_core`` divides by the number of
  devices of all processes (``jax.device_count()``).
  """
  seconds = max(seconds, 1e-9)
  seqs = num_steps * seqs_per_step
  seqs_per_second = seqs / seconds
  target_tokens_per_second = num_steps * target_tokens_per_step / seconds
  cores = jax.device_count()
  return {'timing/seconds': seconds,
          'timing/seqs': float(seqs),
          'timing/steps_per_second': num_steps / seconds,
          'timing/seqs_per_second': seqs_per_second,
          'timing/seqs_per_second_per_core': seqs_per_second / cores,
          'timing/target_tokens_per_second': target_tokens_per_second,
          'timing/target_tokens_per_second_per_core': target_tokens_per_second / cores}


def batch_sizes(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
  """(input and target positions, rows, target positions) of a batch with these shapes."""
  targets = shapes.get('decoder_target_tokens', (0,))
  inputs = shapes.get('encoder_input_tokens', (0,))
  return math.prod(inputs) + math.prod(targets), targets[0], math.prod(targets)


_EVENT_FILES = itertools.count()  # distinguishes writers of one process started in the same second


class _EventFile:
  """TensorBoard scalars appended to one event file in a local folder, without TensorFlow.

  The records and protos are TensorBoard's (``RecordWriter``, ``scalar_pb``), the
  same format tf.summary writes.
  """

  def __init__(self, summary_dir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    os.makedirs(summary_dir, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(_EVENT_FILES)}.v2')
    self._records = record_writer.RecordWriter(open(os.path.join(summary_dir, name), 'ab'))
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event: Any) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboard.plugins.scalar import summary_v2  # pylint: disable=g-import-not-at-top
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
    for tag, value in scalars.items():
      event.summary.value.extend(summary_v2.scalar_pb(tag, np.asarray(value)).value)
    self._write(event)
    self._records.flush()  # summaries are rare; a killed run keeps every one written

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    from tensorboard.plugins.text import summary_v2  # pylint: disable=g-import-not-at-top
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
    for tag, text in texts.items():
      event.summary.value.extend(summary_v2.text_pb(tag, text).value)
    self._write(event)
    self._records.flush()

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


# (root directory, writer, tag prefix) of each tracker registered by ``forward_to_tracker``.
_TRACKERS: list[tuple[str, Any, str]] = []


@contextlib.contextmanager
def forward_to_tracker(root_dir: str, writer: Any, prefix: str = '') -> Iterator[None]:
  """While open, ``SummaryWriter``s made for folders under ``root_dir`` also write to
  ``writer`` (a clu ``MetricWriter``), their tags prefixed with ``prefix`` and the folder's
  path below ``root_dir`` (``MODEL_DIR/training_eval/demo`` + ``loss``:
  ``training_eval/demo/loss``). The caller owns ``writer`` and closes it."""
  entry = (_normalized(root_dir), writer, prefix.strip('/'))
  _TRACKERS.append(entry)
  try:
    yield
  finally:
    _TRACKERS.remove(entry)


def _normalized(directory: str) -> str:
  return str(directory) if paths.is_url(directory) else os.path.abspath(directory)


def _tracker_for(summary_dir: str | None) -> tuple[Any, str]:
  """(the tracker writer, the tag prefix ending in '/') for ``summary_dir``, or (None, '')."""
  if not summary_dir:
    return None, ''
  directory = _normalized(summary_dir)
  for root, writer, prefix in reversed(_TRACKERS):
    if directory == root or directory.startswith(root.rstrip('/') + '/'):
      relative = directory[len(root):].strip('/')
      joined = '/'.join(part for part in (prefix, relative) if part)
      return writer, f'{joined}/' if joined else ''
  return None, ''


class SummaryWriter:
  """TensorBoard scalars and texts under a directory, written by process 0 only (clu's
  ``MetricWriter`` methods ``write_scalars``, ``write_texts``, ``write_hparams``, ``flush``,
  ``close``), and sent to the run's trackers too (see ``forward_to_tracker``)."""

  def __init__(self, summary_dir: str | None):
    self._writer = None
    self._tracker, self._prefix, self._tracker_failed = None, '', False
    if not summary_dir or not multihost.is_primary():
      return
    self._tracker, self._prefix = _tracker_for(summary_dir)
    if paths.is_url(summary_dir):
      from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
      self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(summary_dir))
    else:
      self._writer = _EventFile(summary_dir)

  def _prefixed(self, values: Mapping[str, Any]) -> dict[str, Any]:
    return {f'{self._prefix}{tag}': value for tag, value in values.items()}

  def _to_tracker(self, method: str, *args: Any) -> None:
    """Calls the tracker; a tracker's failure (a server away) is logged, and training goes on
    with TensorBoard, which has everything."""
    if self._tracker is None:
      return
    try:
      getattr(self._tracker, method)(*args)
    except Exception:  # pylint: disable=broad-except
      if not self._tracker_failed:
        logging.exception('A tracker failed to take %s (TensorBoard has them); '
                          'further failures of this writer are logged as warnings.', method)
      else:
        logging.warning('A tracker failed to take %s.', method)
      self._tracker_failed = True

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      self._writer.write_scalars(step, dict(scalars))
    self.write_tracker_scalars(step, scalars)

  def write_tracker_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Scalars for the trackers only, where another writer (seqio's) wrote TensorBoard's."""
    if scalars:
      self._to_tracker('write_scalars', step, self._prefixed(scalars))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Text summaries (TensorBoard's text plugin renders them as Markdown)."""
    if self._writer is not None:
      self._writer.write_texts(step, dict(texts))
    self._to_tracker('write_texts', step, self._prefixed(texts))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's settings, for the trackers (TensorBoard has them as the ``config`` text)."""
    self._to_tracker('write_hparams', dict(hparams))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
    self._to_tracker('flush')

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    self._to_tracker('flush')  # the tracker's owner closes it
    self._tracker = None


_GIB = 1024 ** 3


def memory_scalars() -> dict[str, float]:
  """``memory/*`` figures for summaries, in GiB: this process's peak resident memory, and,
  where the backend reports them (GPU, TPU), the most any local device has in use now and
  has had at its peak."""
  result = {}
  peak = host_memory.peak_rss_bytes()
  if peak is not None:
    result['memory/host_peak_rss_gib'] = peak / _GIB
  stats = [device.memory_stats() or {} for device in jax.local_devices()]
  for key, name in (('bytes_in_use', 'device_in_use_gib'),
                    ('peak_bytes_in_use', 'device_peak_gib'),
                    ('bytes_limit', 'device_limit_gib')):
    values = [s[key] for s in stats if key in s]
    if values:
      result[f'memory/{name}'] = max(values) / _GIB
  return result
