"""Dynamic batching for serving: the rows of concurrent requests decoded or scored together.

A ``Batcher`` owns one worker thread. Requests add rows (one input each) to a bounded queue;
rows that can share a compiled program (same work, same decoding settings, same input-length
bucket and same target- or decode-length bucket) form a group. The worker runs a group once it
holds the largest batch size, or once its oldest row has waited ``window_ms``, at the smallest
batch-size bucket that holds it, so a lone request is not padded to the largest batch. Programs
are compiled ahead of time: at start-up for the ``warmup`` settings, otherwise on first use in a
background thread while the other groups keep running, so the worker never waits on XLA. A
request's future resolves as soon as its own rows are done; a cancelled request's rows leave
the queue. This module knows nothing of HTTP (see ``serving``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec

from t5train import decoding, inference, models
from t5train.partitioning import PjitPartitioner

METHODS = ('greedy', 'sample', 'beam')
KINDS = ('predict', 'score')
# The batch feature (predict) holding each row's decode length, passed to the decoding
# function as its ``max_lengths``.
MAX_LENGTHS = 'max_lengths'


class QueueFull(Exception):
  """The queue holds ``max_queue_rows`` rows already; the caller should retry later."""


class ShuttingDown(Exception):
  """The batcher was closed and takes no new rows."""


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """How rows are batched.

  ``batch_sizes``: the compiled batch sizes (each a multiple of the mesh's data axis); the
  largest is the most rows run together. ``window_ms``: how long the oldest row of a group
  waits for others. ``input_lengths`` / ``target_lengths``: the compiled token lengths of inputs
  and of targets (score) or decodes (predict); an input takes the smallest that holds it.
  ``max_queue_rows``: rows waiting at most (more: ``QueueFull``). ``max_programs``: compiled
  settings kept besides the warmed ones (least recently used are dropped). ``warmup``: what is
  compiled at start-up for every length bucket: 'greedy', 'score', 'beam<N>' (N beams).
  """

  batch_sizes: tuple[int, ...] = (1, 8, 32)
  window_ms: float = 5.0
  input_lengths: tuple[int, ...] = (32, 128)
  target_lengths: tuple[int, ...] = (32,)
  max_queue_rows: int = 256
  max_programs: int = 16
  warmup: tuple[str, ...] = ('greedy', 'score')

  def __post_init__(self) -> None:
    for name in ('batch_sizes', 'input_lengths', 'target_lengths'):
      values = tuple(sorted(int(v) for v in getattr(self, name)))
      if not values or values[0] < 1:
        raise ValueError(f'BatchingConfig.{name} must be positive sizes, not {values}')
      object.__setattr__(self, name, values)
    if self.window_ms < 0 or self.max_queue_rows < 1 or self.max_programs < 1:
      raise ValueError('BatchingConfig: window_ms >= 0, max_queue_rows >= 1 and max_programs >= 1')
    for item in self.warmup:
      if not (item in ('greedy', 'score') or (item.startswith('beam') and item[4:].isdigit())):
        raise ValueError(f"BatchingConfig.warmup items are 'greedy', 'score' or 'beam<N>', "
                         f'not {item!r}')


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
  """How to decode: greedy, sampling (temperature, top-k (0: all), top-p (1: off)) or beam
  search (num_beams, length penalty alpha). Fields that do not apply keep their defaults, so
  equal settings group together."""

  method: str = 'greedy'
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  alpha: float = 0.6

  def decode_fn(self) -> tuple[Any, dict[str, Any]]:
    """The decoding function and its arguments."""
    if self.method == 'greedy':
      return decoding.temperature_sample, {'temperature': 0.0, 'num_decodes': 1}
    if self.method == 'sample':
      return decoding.temperature_sample, {
          'temperature': self.temperature, 'topk': self.top_k,
          'topp': self.top_p if self.top_p < 1.0 else 0.0, 'num_decodes': 1}
    if self.method == 'beam':
      return decoding.beam_search, {'num_decodes': self.num_beams, 'alpha': self.alpha}
    raise ValueError(f'unknown decoding method {self.method!r}')


GREEDY = DecodingSettings()


class Observer(Protocol):
  """What the batcher reports (the server's metrics)."""

  def batch_done(self, kind: str, rows: int, batch_size: int, seconds: float,
                 generated_tokens: int) -> None: ...

  def rows_dropped(self, rows: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class Row:
  """One input: its token ids (with EOS) and, to score, its target ids (with EOS)."""

  inputs: Sequence[int]
  targets: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
  tokens: np.ndarray  # [decode length] ids, 0 after EOS
  score: float


GroupKey = tuple[str, DecodingSettings | None, int, int]  # kind, settings, input, target length


class Ticket:
  """A submitted request: its future (a list of results, one per row, in order) and cancel()."""

  def __init__(self, num_rows: int, on_cancel: Callable[[], None] | None = None):
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.future.set_running_or_notify_cancel()  # only the batcher ends it
    self.results: list[Any] = [None] * num_rows
    self.remaining = num_rows
    self.cancelled = False
    self._on_cancel = on_cancel

  def cancel(self) -> None:
    """Drops the rows that have not run yet (the client went away)."""
    self.cancelled = True
    if self._on_cancel is not None:
      self._on_cancel()


@dataclasses.dataclass
class _Queued:
  ticket: Ticket
  index: int
  features: dict[str, np.ndarray]
  arrival: float


class Batcher:
  """Compiled predict and score programs over dynamic batches, run by one worker thread."""

  def __init__(self, model: models.BaseTransformerModel, partitioner: PjitPartitioner,
               params: Any, param_shardings: Any, config: BatchingConfig, seed: int = 0,
               observer: Observer | None = None):
    for size in config.batch_sizes:
      partitioner.get_data_layout(size)  # a UserError if it does not split over the data axis
    self.model, self.config = model, config
    self._partitioner, self._params, self._param_shardings = partitioner, params, param_shardings
    self._batch_sharding = partitioner.sharding(partitioner.data_partition_spec)
    self._replicated = partitioner.sharding(PartitionSpec())
    self.observer = observer
    self._rng = jax.random.PRNGKey(seed)
    self._batches_run = 0
    self._cond = threading.Condition()
    self._groups: dict[GroupKey, collections.deque[_Queued]] = {}
    self._queued_rows = 0
    self._programs: collections.OrderedDict[GroupKey, dict[int, Any]] = collections.OrderedDict()
    self._pinned: set[GroupKey] = set()
    self._compiling: set[GroupKey] = set()
    self._failed: dict[GroupKey, Exception] = {}
    self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
    self._closed = False
    self.ready = False
    self._worker = threading.Thread(target=self._work, name='batcher', daemon=True)
    self._worker.start()

  # -- sizes --------------------------------------------------------------------------------

  @property
  def max_input_length(self) -> int:
    return self.config.input_lengths[-1]

  @property
  def max_target_length(self) -> int:
    return self.config.target_lengths[-1]

  @property
  def queued_rows(self) -> int:
    return self._queued_rows

  def _lengths(self, input_length: int, target_length: int) -> dict[str, int]:
    return {'inputs': input_length, 'targets': target_length}

  # -- compiling ----------------------------------------------------------------------------

  def _abstract_batch(self, kind: str, lengths: Mapping[str, int], batch_size: int
                      ) -> dict[str, jax.ShapeDtypeStruct]:
    example = {'inputs': [1]} if kind == 'predict' else {'inputs': [1], 'targets': [1]}
    features = self.model.example_features(example, lengths)
    if kind == 'predict':
      features[MAX_LENGTHS] = np.asarray(1, np.int32)
    return {name: jax.ShapeDtypeStruct((batch_size, *value.shape), value.dtype)
            for name, value in features.items()}

  def _compile(self, key: GroupKey) -> dict[int, Any]:
    """The programs of ``key``, one per batch size."""
    kind, settings, input_length, target_length = key
    lengths = self._lengths(input_length, target_length)
    if kind == 'predict':
      decode_fn, decoder_params = settings.decode_fn()
      model = copy.copy(self.model)  # the model holds no state; only its decode_fn differs
      model.decode_fn = decode_fn

      def fn(params, batch, rng):
        # Each row decodes at most its own max_new_tokens (a traced [batch] array, so rows
        # asking for different numbers share the program): its decode stops there, and its
        # score (and beam search's length penalty) is that of the decode returned.
        batch = dict(batch)
        max_lengths = batch.pop(MAX_LENGTHS)
        return model.predict_batch_with_aux(
            params, batch, rng, {**decoder_params, 'max_lengths': max_lengths},
            max_decode_length=target_length)

      partitioned = self._partitioner.partition(
          fn, in_shardings=(self._param_shardings, self._batch_sharding, self._replicated),
          out_shardings=self._replicated)
    else:
      partitioned = self._partitioner.partition(
          self.model.score_batch, in_shardings=(self._param_shardings, self._batch_sharding),
          out_shardings=self._replicated)
    programs = {}
    for size in self.config.batch_sizes:
      args = [self._params, self._abstract_batch(kind, lengths, size)]
      if kind == 'predict':
        args.append(self._rng)
      programs[size] = self._partitioner.compile(partitioned, *args)
    return programs

  def warm_up(self) -> None:
    """Compiles the ``warmup`` settings for every length bucket, then marks the batcher ready."""
    started = time.perf_counter()
    for item in self.config.warmup:
      if item == 'score':
        kind, settings = 'score', None
      else:
        kind = 'predict'
        settings = GREEDY if item == 'greedy' else DecodingSettings('beam', num_beams=int(item[4:]))
      for input_length in self.config.input_lengths:
        for target_length in self.config.target_lengths:
          key = (kind, settings, input_length, target_length)
          programs = self._compile(key)
          with self._cond:
            self._programs[key] = programs
            self._pinned.add(key)
    logging.info('Compiled %d programs for serving in %.1f s.',
                 len(self._pinned) * len(self.config.batch_sizes), time.perf_counter() - started)
    self.ready = True

  def _compile_in_background(self, key: GroupKey) -> None:
    self._compiling.add(key)

    def done(future: concurrent.futures.Future) -> None:
      with self._cond:
        self._compiling.discard(key)
        if future.exception() is not None:
          self._failed[key] = future.exception()
        else:
          self._programs[key] = future.result()
          unpinned = [k for k in self._programs if k not in self._pinned]
          for old in unpinned[:max(0, len(unpinned) - self.config.max_programs)]:
            del self._programs[old]
        self._cond.notify_all()

    self._compiler.submit(self._compile, key).add_done_callback(done)

  # -- submitting ---------------------------------------------------------------------------

  def submit(self, kind: str, rows: Sequence[Row], settings: DecodingSettings | None = None,
             decode_length: int | None = None) -> Ticket:
    """Queues ``rows``; the ticket's future gets a ``Prediction`` (predict) or a float
    log-likelihood (score) per row. ``decode_length`` (predict): tokens to decode at most
    (default: the longest target length); the decode stops there and its score is that of the
    tokens returned. Raises QueueFull or ShuttingDown."""
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, not {kind!r}')
    settings = (settings or GREEDY) if kind == 'predict' else None
    ticket = Ticket(len(rows), on_cancel=self._wake)
    queued = []
    now = time.perf_counter()
    for index, row in enumerate(rows):
      input_length = inference.smallest_bucket(len(row.inputs), self.config.input_lengths)
      wanted = len(row.targets) if kind == 'score' else (decode_length or self.max_target_length)
      target_length = inference.smallest_bucket(wanted, self.config.target_lengths)
      if input_length is None or target_length is None:
        raise ValueError(f'row {index} is longer than the longest length bucket')
      example = {'inputs': row.inputs} if kind == 'predict' else {'inputs': row.inputs,
                                                                   'targets': row.targets}
      features = self.model.example_features(example, self._lengths(input_length, target_length))
      if kind == 'predict':
        features[MAX_LENGTHS] = np.asarray(wanted, np.int32)
      queued.append(((kind, settings, input_length, target_length),
                     _Queued(ticket, index, features, now)))
    if not rows:
      ticket.future.set_result([])
      return ticket
    with self._cond:
      if self._closed:
        raise ShuttingDown('the server is shutting down')
      if self._queued_rows + len(rows) > self.config.max_queue_rows:
        raise QueueFull(f'the queue is full ({self._queued_rows} rows waiting)')
      for key, item in queued:
        self._groups.setdefault(key, collections.deque()).append(item)
      self._queued_rows += len(rows)
      self._cond.notify_all()
    return ticket

  def _wake(self) -> None:
    """Lets the worker drop cancelled rows now rather than when it next looks."""
    with self._cond:
      self._cond.notify_all()

  # -- the worker ---------------------------------------------------------------------------

  def _prune_locked(self) -> None:
    """Drops the rows of cancelled requests and of settings that failed to compile."""
    dropped = 0
    for key, group in list(self._groups.items()):
      kept = collections.deque(item for item in group if not item.ticket.cancelled)
      dropped += len(group) - len(kept)
      error = self._failed.get(key)
      if error is not None:
        for item in kept:
          if not item.ticket.future.done():
            item.ticket.future.set_exception(error)
        dropped += len(kept)
        kept.clear()
        del self._failed[key]
      if kept:
        self._groups[key] = kept
      else:
        del self._groups[key]
    self._queued_rows -= dropped
    if dropped and self.observer is not None:
      self.observer.rows_dropped(dropped)

  def _take_locked(self) -> tuple[GroupKey | None, list[_Queued], float | None]:
    """The group to run now and its rows, or (None, [], seconds to wait)."""
    self._prune_locked()
    now, wait, best = time.perf_counter(), None, None
    largest, window = self.config.batch_sizes[-1], self.config.window_ms / 1000
    for key, group in self._groups.items():
      if key not in self._programs:
        if key not in self._compiling:
          self._compile_in_background(key)
        continue
      due = group[0].arrival + window
      if len(group) >= largest or due <= now or self._closed:
        if best is None or group[0].arrival < self._groups[best][0].arrival:
          best = key
      else:
        wait = due - now if wait is None else min(wait, due - now)
    if best is None:
      return None, [], wait
    self._programs.move_to_end(best)
    group = self._groups[best]
    rows = [group.popleft() for _ in range(min(largest, len(group)))]
    if not group:
      del self._groups[best]
    self._queued_rows -= len(rows)
    return best, rows, None

  def _work(self) -> None:
    while True:
      with self._cond:
        while True:
          key, rows, wait = self._take_locked()
          if key is not None:
            break
          if self._closed and not self._groups:
            return
          self._cond.wait(wait)
        programs = self._programs[key]
      self._run(key, programs, rows)

  def _device_batch(self, rows: Sequence[_Queued], size: int) -> dict[str, jax.Array]:
    features = [row.features for row in rows]
    features += [features[-1]] * (size - len(features))
    batch = {}
    for name in features[0]:
      host = np.stack([f[name] for f in features])
      batch[name] = jax.make_array_from_callback(host.shape, self._batch_sharding,
                                                 lambda index, h=host: h[index])
    return batch

  def _run(self, key: GroupKey, programs: dict[int, Any], rows: list[_Queued]) -> None:
    """Runs one batch and hands each row's result to its ticket."""
    kind = key[0]
    size = inference.smallest_bucket(len(rows), self.config.batch_sizes)
    started = time.perf_counter()
    generated = 0
    try:
      batch = self._device_batch(rows, size)
      if kind == 'predict':
        rng = jax.random.fold_in(self._rng, self._batches_run)
        tokens, aux = jax.device_get(programs[size](self._params, batch, rng))
        scores = np.asarray(aux['scores'])
        results = [Prediction(np.asarray(tokens[i]), float(scores[i])) for i in range(len(rows))]
        generated = sum(int(np.count_nonzero(r.tokens)) for r in results)
      else:
        scores = np.asarray(jax.device_get(programs[size](self._params, batch)))
        results = [float(scores[i]) for i in range(len(rows))]
    except Exception as e:  # pylint: disable=broad-except  (fails these requests, not the server)
      logging.exception('A batch of %d rows failed.', len(rows))
      for row in rows:
        if not row.ticket.future.done():
          row.ticket.future.set_exception(e)
      return
    finally:
      self._batches_run += 1
    for row, result in zip(rows, results):
      ticket = row.ticket
      ticket.results[row.index] = result
      ticket.remaining -= 1
      if ticket.remaining == 0 and not ticket.future.done():
        ticket.future.set_result(ticket.results)
    if self.observer is not None:
      self.observer.batch_done(kind, len(rows), size, time.perf_counter() - started, generated)

  def close(self, timeout_secs: float | None = None) -> None:
    """Takes no new rows, runs the queued ones (without waiting for windows), then stops."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._worker.join(timeout_secs)
    self._compiler.shutdown(wait=False, cancel_futures=True)
