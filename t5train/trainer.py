"""The train step (pure, jitted through the partitioner) and the one training loop.

``train_step`` takes arrays and returns arrays; ``Trainer`` owns the compiled
step and the current state; ``run_training`` is the loop with its periodic
actions (progress line, TensorBoard summaries, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import clu.metrics as clu_metrics
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import PartitionSpec

from t5train import host_memory, models, optimizers
from t5train.checkpoints import CheckpointManager
from t5train.errors import TrainingError, UserError
from t5train.metrics import MetricsWindow, SummaryWriter, batch_sizes, memory_scalars
from t5train.optimizers import LearningRateFn
from t5train.partitioning import PjitPartitioner
from t5train.preemption import StopRequest
from t5train.train_state import TrainState

Batch = Mapping[str, jax.Array]


def _split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
  """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...].

  Microbatch i takes rows i, i + n, i + 2n, ... so that each microbatch is spread
  over every data-parallel shard rather than living on a few of them.
  """
  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % num_microbatches:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by {num_microbatches} '
                       'microbatches')
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return {name: split(x) for name, x in batch.items()}


def _trainable_split(params: Any, trainable: Callable[[str], bool] | None
                     ) -> tuple[Any, Callable[[Any], Any], Callable[[Any], Any]]:
  """(the parameters to differentiate, a function that rebuilds the whole tree from them, and
  one that pads their gradients with zeros for the frozen rest)."""
  if trainable is None:
    return params, lambda part: part, lambda grads: grads
  flat = traverse_util.flatten_dict(params)
  frozen = {path: x for path, x in flat.items() if not trainable(optimizers.param_path(path))}
  part = {path: x for path, x in flat.items() if path not in frozen}
  rebuild = lambda part: traverse_util.unflatten_dict({**frozen, **part})
  pad = lambda grads: traverse_util.unflatten_dict(
      {**{path: jnp.zeros_like(x) for path, x in frozen.items()}, **grads})
  return part, rebuild, pad


def _trained_mask(params: Any, trainable: Callable[[str], bool] | None) -> Any:
  """A tree of bools like ``params``: which parameters the optimiser updates."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: trainable is None or trainable(optimizers.param_path(
          tuple(getattr(k, 'key', k) for k in path))), params)


def _loss_and_grads(model: models.BaseTransformerModel, params: Any, batch: Batch,
                    dropout_rng: jax.Array, num_microbatches: int | None,
                    trainable: Callable[[str], bool] | None = None
                    ) -> tuple[Any, dict[str, jax.Array]]:
  """Gradients of the batch loss and its metric sums, accumulated over microbatches.

  Only the ``trainable`` parameters are differentiated (all without it); the gradients of the
  others are zeros, which the optimiser of frozen parameters never reads.
  """
  batch, factor = model.normalize_loss_weights(batch)
  part, rebuild, pad = _trainable_split(params, trainable)
  loss_fn = functools.partial(model.loss_fn, loss_normalizing_factor=factor, normalized=True)
  grad_fn = jax.value_and_grad(lambda part, *args: loss_fn(rebuild(part), *args), has_aux=True)
  if not num_microbatches or num_microbatches == 1:
    (_, sums), grads = grad_fn(part, batch, dropout_rng)
    return pad(grads), sums

  def accumulate(grad_sum: Any, micro: tuple[jax.Array, Batch]) -> tuple[Any, dict]:
    index, microbatch = micro
    (_, sums), grads = grad_fn(part, microbatch, jax.random.fold_in(dropout_rng, index))
    return jax.tree_util.tree_map(jnp.add, grad_sum, grads), sums

  zeros = jax.tree_util.tree_map(jnp.zeros_like, part)
  micro = (jnp.arange(num_microbatches), _split_microbatches(batch, num_microbatches))
  grads, stacked = jax.lax.scan(accumulate, zeros, micro)
  return pad(grads), jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), stacked)


NONFINITE = 'nonfinite_step_fraction'


class PreemptionError(Exception):
  """Training was asked to stop (T5X's name; callers save an emergency checkpoint on it)."""


def train_step(model: models.BaseTransformerModel, tx: optax.GradientTransformation,
               learning_rate_fn: LearningRateFn, num_microbatches: int | None,
               skip_nonfinite: bool, state: TrainState, batch: Batch, rng: jax.Array
               ) -> tuple[TrainState, models.Metrics]:
  """One optimiser update; dropout randomness is derived from ``rng`` and the step.

  A step whose loss, gradient norm or update norm is not finite is flagged in the
  ``nonfinite_step_fraction`` metric. With ``skip_nonfinite`` it leaves the
  parameters and optimiser state as they were (the step count still advances);
  without it the loop stops on it, and a step whose loss or gradients are not
  finite leaves the parameters as they were. That condition on the gradient norm
  also orders each parameter's update after every read of its old value, so XLA
  writes the new value in place instead of copying all parameters first.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  trainable = optimizers.trainable_fn(model.optimizer_def)
  grads, sums = _loss_and_grads(model, state.params, batch, dropout_rng, num_microbatches,
                                trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Frozen parameters are read, never written: their (zero) gradients and updates are left out
  # of the norms and the new state, so XLA computes none of them and keeps the old buffers.
  trained = _trained_mask(state.params, trainable)
  of_trained = lambda tree: [x for x, keep in zip(jax.tree_util.tree_leaves(tree),
                                                  jax.tree_util.tree_leaves(trained)) if keep]
  grads_finite = jnp.isfinite(sums['loss']) & jnp.isfinite(optax.global_norm(of_trained(grads)))
  finite = grads_finite & jnp.isfinite(optax.global_norm(of_trained(updates)))
  use_new = finite if skip_nonfinite else grads_finite
  pick = lambda new, old: jnp.where(use_new, new, old)
  params = jax.tree_util.tree_map(lambda keep, new, old: pick(new, old) if keep else old,
                                  trained, params, state.params)
  if skip_nonfinite:  # always picking the state too makes XLA copy it instead (AdamW's moments)
    opt_state = jax.tree_util.tree_map(pick, opt_state, state.opt_state)
  metrics = model.metrics(sums)
  average = type(metrics['loss'])
  one = jnp.ones((), jnp.int32)
  metrics['learning_rate'] = average(total=learning_rate_fn(state.step), count=one)
  metrics['learning_rate/current'] = clu_metrics.LastValue(total=metrics['learning_rate'].total,
                                                          count=one)
  metrics[NONFINITE] = average(total=1.0 - finite.astype(jnp.float32), count=one)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class Trainer:
  """Holds the train state and the compiled train step (T5X's constructor names).

  The step is compiled for each new batch shape before it runs, and the memory
  the compiler freed is handed back to the system before the step allocates its own.
  """

  def __init__(self, model: models.BaseTransformerModel, train_state: TrainState,
               partitioner: PjitPartitioner, train_state_axes: TrainState, rng: jax.Array,
               learning_rate_fn: LearningRateFn, num_microbatches: int | None = None,
               summary_dir: str | None = None, eval_names: tuple[str, ...] = (),
               skip_nonfinite: bool = False):
    del eval_names  # evaluation during training is run by its own loop
    self.model = model
    self.train_state = train_state
    self.stop_training = False
    self.skip_nonfinite = skip_nonfinite
    self._rng = rng
    self._init_time = time.time()  # for T5X's timing/uptime
    self._writer = SummaryWriter(summary_dir)
    tx = model.optimizer_def.make(learning_rate_fn)
    state_shardings = partitioner.mesh_shardings(train_state_axes)
    batch_sharding = partitioner.sharding(partitioner.data_partition_spec)
    replicated = partitioner.sharding(PartitionSpec())
    self._partitioner = partitioner
    self._step_fn = partitioner.partition(
        functools.partial(train_step, model, tx, learning_rate_fn, num_microbatches,
                          skip_nonfinite),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,),
        compiler_options=partitioner.train_step_compiler_options())
    self._compiled: dict[tuple, jax.stages.Compiled] = {}

  def train_step(self, batch: Batch) -> models.Metrics:
    """Runs one step on ``batch``; returns its metrics without waiting for them."""
    key = tuple((name, x.shape, x.dtype) for name, x in sorted(batch.items()))
    step_fn = self._compiled.get(key)
    if step_fn is None:
      start = time.time()
      step_fn = self._partitioner.compile(self._step_fn, self.train_state, batch, self._rng)
      self._compiled[key] = step_fn
      self._writer.write_scalars(int(jax.device_get(self.train_state.step)),
                                 {'timing/compilation_seconds': time.time() - start})
      host_memory.release_freed_memory()
    self.train_state, metrics = step_fn(self.train_state, batch, self._rng)
    return metrics

  def train(self, batch_iter: Iterator[Batch], num_steps: int, start_step: int | None = None
            ) -> 'TrainSummary':
    """Runs ``num_steps`` steps, writes one TensorBoard summary, returns the metrics."""
    window = None
    for _ in range(num_steps):
      if self.stop_training:
        raise PreemptionError('training was asked to stop (Trainer.stop_training)')
      batch = next(batch_iter)
      if window is None:
        window = MetricsWindow(*batch_sizes({name: x.shape for name, x in batch.items()}))
      window.add(self.train_step(batch))
    summary = window.summary() if window is not None else {}
    if summary:
      summary['timing/uptime'] = self.uptime()
    step = start_step + num_steps if start_step is not None else int(self.train_state.step)
    self.write_summary(step, summary)
    return TrainSummary(summary)

  def uptime(self) -> float:
    """Seconds since the trainer was made (T5X's ``timing/uptime``)."""
    return time.time() - self._init_time

  @property
  def summary_writer(self) -> SummaryWriter:
    """The writer of ``MODEL_DIR/train`` (T5X: ``train_metrics_manager.summary_writer``)."""
    return self._writer

  def write_summary(self, step: int, summary: Mapping[str, float]) -> None:
    self._writer.write_scalars(step, summary)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class TrainSummary:
  """The metrics of a call to ``Trainer.train``; ``result()`` gives name -> float."""

  def __init__(self, values: Mapping[str, float]):
    self._values = dict(values)

  def result(self) -> dict[str, float]:
    return dict(self._values)


def _progress_line(step: int, last_step: int, summary: Mapping[str, float],
                   loop_start: float, first_step: int) -> str:
  steps_done = step - first_step
  rate = steps_done / max(time.perf_counter() - loop_start, 1e-9)
  eta = (last_step - step) / rate if rate > 0 else float('inf')
  return (f'step {step}/{last_step}  loss {summary.get("cross_ent_per_nonpadding_target_token", 0):.4f}'
          f'  accuracy {summary.get("accuracy", 0):.4f}'
          f'  steps/s {summary.get("timing/steps_per_second", 0):.2f}'
          f'  tokens/s {summary.get("timing/tokens_per_second", 0):,.0f}'
          f'  waiting for data {_share(summary, "data"):.0%}'
          f'  eta {time.strftime("%H:%M:%S", time.gmtime(min(eta, 359999)))}')


def _share(summary: Mapping[str, float], phase: str) -> float:
  """The fraction of the loop's time that went to ``phase`` (see MetricsWindow)."""
  total = sum(v for k, v in summary.items() if k.startswith('timing/') and
              k.endswith('_secs_per_step'))
  return summary.get(f'timing/{phase}_secs_per_step', 0.0) / total if total > 0 else 0.0


def check_finite_check_period(period: int) -> None:
  """UserError unless ``period`` (steps between reads of the non-finite flags) is at least 1."""
  if period < 1:
    raise UserError(f'finite_check_period must be at least 1, got {period}')


class _FiniteChecks:
  """Reads the steps' non-finite flags in groups, so that the host rarely waits on the device.

  Flags are read every ``period`` steps, leaving the newest step running, and in
  full by ``check()`` before anything is saved. The error names the first bad step.
  """

  def __init__(self, trainer: Trainer, period: int):
    check_finite_check_period(period)
    self._enabled = not trainer.skip_nonfinite
    self._period = period
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, metrics: models.Metrics) -> None:
    if not self._enabled:
      return
    self._pending.append((step, metrics[NONFINITE].total))
    if len(self._pending) > self._period:
      self._read(len(self._pending) - 1)

  def check(self) -> None:
    """TrainingError if any step added so far was not finite."""
    self._read(len(self._pending))

  def _read(self, count: int) -> None:
    ready, self._pending = self._pending[:count], self._pending[count:]
    flags = jax.device_get([flag for _, flag in ready])
    bad = [step for (step, _), flag in zip(ready, flags) if float(flag) > 0]
    if bad:
      raise TrainingError(
          f'the loss or gradients became NaN or infinite at step {bad[0]}; stopping. '
          'Checkpoints before this step are kept. Lower the learning rate, or set '
          'train_script.train.skip_nonfinite_steps = True to skip such steps')


@contextlib.contextmanager
def _timed(windows: Sequence[MetricsWindow], phase: str) -> Iterator[None]:
  """Counts the time spent in the block as ``phase`` in each window."""
  start = time.perf_counter()
  try:
    yield
  finally:
    for window in windows:
      window.add_seconds(phase, time.perf_counter() - start)


EARLY_STOPPING = 'early stopping'


class StepHook(Protocol):
  """Called around each step of ``run_training`` (e.g. ``profiling.RangeProfiler``): ``before``
  the step is dispatched, ``after`` with its metrics (not waited for)."""

  def before(self, step: int) -> None: ...

  def after(self, step: int, outputs: Any) -> None: ...


@dataclasses.dataclass
class LoopResult:
  """What ``run_training`` did: the last window's metrics, the last step, a signal if stopped."""

  summary: dict[str, float]
  last_step: int
  stopped_by: str | None = None  # a signal's name, or EARLY_STOPPING


def run_training(trainer: Trainer, batches: Iterator[Batch], first_step: int, last_step: int,
                 checkpoints: CheckpointManager | None, summary_period: int,
                 log_every_secs: float = 5.0, batch_shapes: Mapping[str, tuple] | None = None,
                 log_fn: Callable[[str], None] = logging.info,
                 evaluate: Callable[[int], bool | None] | None = None,
                 eval_period: int | None = None, stop_request: StopRequest | None = None,
                 finite_check_period: int = 10,
                 data_scalars_fn: Callable[[], dict[str, float]] | None = None,
                 step_hooks: Sequence[StepHook] = ()) -> LoopResult:
  """Trains from ``first_step`` to ``last_step``.

  Every ``summary_period`` steps the window's metrics go to TensorBoard; every
  ``log_every_secs`` a progress line is logged; ``evaluate(step)`` runs every
  ``eval_period`` steps; the checkpoint manager saves as its policy says. All of
  them also act at the last step, and no period needs to divide another. A
  non-finite step raises TrainingError: the steps' flags are read every
  ``finite_check_period`` steps (so the host does not wait on each step) and
  always before a save. When ``stop_request`` says so, or ``evaluate`` returns True (early
  stopping), the loop saves a checkpoint at the current step and returns. ``data_scalars_fn`` adds the input
  pipeline's counters to each summary, which also hold the ``memory/*`` figures.
  ``step_hooks`` are called around each step (a profiler of some steps).
  """
  sizes = batch_sizes(batch_shapes or {})
  new_window = lambda: MetricsWindow(*sizes)
  summary_window, log_window = new_window(), new_window()
  loop_start, last_log = time.perf_counter(), time.perf_counter()
  summary: dict[str, float] = {}
  finite_checks = _FiniteChecks(trainer, finite_check_period)
  step, stopped_by = first_step, None
  windows = (summary_window, log_window)
  for step in range(first_step + 1, last_step + 1):
    data_start = time.perf_counter()
    with _timed(windows, 'data'):
      batch = next(batches)
    if step == first_step + 1:  # T5X's wait for the input pipeline's first batch
      trainer.write_summary(first_step, {'timing/train_iter_warmup':
                                         time.perf_counter() - data_start})
    for hook in step_hooks:
      hook.before(step)
    metrics = trainer.train_step(batch)
    for hook in step_hooks:
      hook.after(step, metrics)
    finite_checks.add(step, metrics)
    summary_window.add(metrics)
    log_window.add(metrics)
    evaluating = evaluate is not None and eval_period and (step % eval_period == 0 or
                                                           step == last_step)
    stop_early = False
    if evaluating:
      eval_start = time.perf_counter()
      with _timed(windows, 'evaluation'):
        stop_early = bool(evaluate(step))
      trainer.write_summary(step, {'timing/evaluate_seconds': time.perf_counter() - eval_start})
    stop = stop_early or (stop_request is not None and stop_request.requested(step))
    if checkpoints is not None and (checkpoints.should_save(step) or step == last_step or stop):
      finite_checks.check()
      save_start = time.perf_counter()
      with _timed(windows, 'checkpoint'):
        checkpoints.save(trainer.train_state, force=True)
      trainer.write_summary(step, {'timing/checkpoint_seconds': time.perf_counter() - save_start})
    if step % summary_period == 0 or step == last_step:
      summary = (summary_window.summary() | {'timing/uptime': trainer.uptime()} |
                 (data_scalars_fn() if data_scalars_fn else {}) | memory_scalars())
      trainer.write_summary(step, summary)
      summary_window.reset()
    if time.perf_counter() - last_log >= log_every_secs or step == last_step:
      log_fn(_progress_line(step, last_step, log_window.summary(), loop_start, first_step))
      log_window.reset()
      last_log = time.perf_counter()
    if stop:
      stopped_by = (EARLY_STOPPING if stop_early else
                    stop_request.signal_name or 'a signal on another process')
      break
  finite_checks.check()
  if checkpoints is not None:
    checkpoints.wait_until_finished()
  if stopped_by is not None:
    summary = summary_window.summary() or summary
    log_fn(f'Stopped by {stopped_by} after step {step}: checkpoint_{step} is saved' +
           ('.' if stopped_by == EARLY_STOPPING else '; rerun the same command to resume.'))
  trainer.flush()
  return LoopResult(summary=summary, last_step=step, stopped_by=stopped_by)
