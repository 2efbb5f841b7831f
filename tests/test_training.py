"""The train step: learning, microbatching, schedules, optimiser state sharding axes."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5train import optimizers, partitioning, testing, train_state, trainer
from t5train.errors import TrainingError, UserError


def _setup(model, batch, learning_rate_fn, num_microbatches=None, skip_nonfinite=False):
  return testing.tiny_trainer(model, batch, learning_rate_fn, num_microbatches=num_microbatches,
                              skip_nonfinite=skip_nonfinite).trainer


def test_tiny_model_overfits_one_batch():
  model = testing.tiny_model(loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  batch = testing.random_batch(batch_size=4, input_length=10, target_length=6)
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 1e-2))
  losses = [float(t.train_step(batch)['loss'].compute()) for _ in range(150)]
  assert losses[0] > 3.0  # about log(64) at initialisation
  assert losses[-1] < 0.05, losses[-10:]
  assert int(t.train_state.step) == 150


def test_adafactor_learns_too():
  model = testing.tiny_model(optimizer_def=optimizers.Adafactor())
  batch = testing.random_batch(batch_size=4, input_length=10, target_length=6)
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 0.1))
  first = float(t.train_step(batch)['cross_ent_loss_per_all_target_tokens'].compute())
  for _ in range(60):
    last = float(t.train_step(batch)['cross_ent_loss_per_all_target_tokens'].compute())
  assert last < 0.5 * first


@pytest.mark.parametrize('normalizer', [None, 'NUM_REAL_TARGET_TOKENS'])
def test_microbatches_give_the_same_update(normalizer):
  model = testing.tiny_model(loss_normalizing_factor=normalizer)
  batch = testing.random_batch(batch_size=8, seed=5)
  lr = optimizers.create_learning_rate_scheduler('constant', 1e-3)
  whole, split = _setup(model, batch, lr), _setup(model, batch, lr, num_microbatches=4)
  whole_metrics, split_metrics = whole.train_step(batch), split.train_step(batch)
  names = ('loss', 'accuracy', 'cross_ent_loss_per_all_target_tokens')
  testing.assert_trees_close({name: float(split_metrics[name].compute()) for name in names},
                             {name: float(whole_metrics[name].compute()) for name in names})
  testing.assert_trees_close(split.train_state.params, whole.train_state.params)


def test_learning_rate_schedules():
  # A few float32 scalar ops against exact values: rounding only, hence tighter than SIMPLE_RTOL.
  fn = optimizers.create_learning_rate_scheduler('constant * linear_warmup * rsqrt_decay',
                                                 base_learning_rate=1.0, warmup_steps=100)
  np.testing.assert_allclose([float(fn(s)) for s in (0, 50, 100, 400)],
                             [1e-8, 0.5 / 10, 1 / 10, 1 / 20], rtol=1e-6)
  cosine = optimizers.create_learning_rate_scheduler(
      'constant * cosine_decay', base_learning_rate=2.0, warmup_steps=0, steps_per_cycle=100)
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 50, 100, 150)], [2.0, 1.0, 1e-8, 1e-8],
                             rtol=1e-6, atol=1e-7)
  linear = optimizers.create_learning_rate_scheduler(
      'constant * linear_decay', base_learning_rate=1.0, warmup_steps=10, steps_per_cycle=10)
  np.testing.assert_allclose([float(linear(s)) for s in (5, 15, 25)], [1.0, 0.5, 1e-8], rtol=1e-6)
  with pytest.raises(ValueError, match='unknown learning-rate factor'):
    optimizers.create_learning_rate_scheduler('constant * warmup')


def test_adafactor_factored_moments_take_reduced_axes():
  model = testing.tiny_model(testing.tiny_config(emb_dim=128, mlp_dim=256),
                             optimizer_def=optimizers.Adafactor())
  batch = testing.random_batch()
  initializer = train_state.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, testing.input_shapes(batch))
  factored = initializer.train_state_logical_axes.opt_state[0]
  wi = ('encoder', 'layers_0', 'mlp', 'wi_0', 'kernel')
  pick = lambda tree: tree[wi[0]][wi[1]][wi[2]][wi[3]][wi[4]]
  assert tuple(pick(initializer.train_state_logical_axes.params)) == ('embed', 'mlp')
  assert tuple(pick(factored.v_row)) == ('embed',)
  assert tuple(pick(factored.v_col)) == ('mlp',)


def test_partitioner_rejects_indivisible_device_counts():
  from t5train.errors import UserError
  with pytest.raises(UserError, match='multiple of the number of model partitions'):
    partitioning.PjitPartitioner(num_partitions=len(jax.devices()) + 1).validate()


def test_optax_adafactor_defaults_are_t5x():
  # decay 1 - t**-0.8 at step 1 is 0: the first second-moment estimate is the squared gradient.
  tx = optimizers.Adafactor().make(lambda step: jnp.asarray(1.0))
  params = {'w': jnp.ones((4,))}
  updates, _ = tx.update({'w': jnp.full((4,), 2.0)}, tx.init(params), params)
  # RMS-normalised update of size 1, times parameter scale max(rms(w), 1e-3) = 1, negated.
  testing.assert_trees_close(updates['w'], -np.ones(4), rtol=testing.SIMPLE_RTOL)
  assert isinstance(tx, optax.GradientTransformation)


class _SlowSaves:
  """A checkpoint manager stand-in whose saves take ``seconds``, every ``period`` steps."""

  def __init__(self, seconds, period):
    self.seconds, self.period, self.saved = seconds, period, []

  def should_save(self, step):
    return step % self.period == 0

  def save(self, state, force=False):
    time.sleep(self.seconds)
    self.saved.append(int(state.step))

  def wait_until_finished(self):
    pass


def test_loop_reports_where_its_time_goes():
  model = testing.tiny_model()
  batch = testing.random_batch()
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 1e-3))
  t.train_step(batch)  # compiled before the timed loop

  def slow_batches():
    while True:
      time.sleep(0.1)
      yield batch

  saves, lines = _SlowSaves(0.3, period=2), []
  result = trainer.run_training(t, slow_batches(), 1, 5, saves, summary_period=4,
                                log_every_secs=1e9, log_fn=lines.append,
                                evaluate=lambda step: time.sleep(0.4), eval_period=2)
  assert saves.saved == [2, 4, 5]  # the period and the last step
  summary = result.summary  # the window of step 5 alone: one batch, one save, one evaluation
  # Each wait counted once, under its own phase (the bounds leave room for a busy machine).
  assert 0.1 <= summary['timing/data_secs_per_step'] < 0.3
  assert 0.3 <= summary['timing/checkpoint_secs_per_step'] < 0.6
  assert 0.4 <= summary['timing/evaluation_secs_per_step'] < 0.7
  assert 0.0 <= summary['timing/compute_secs_per_step'] < 0.3
  # Throughput leaves evaluation out, but counts the waits for data and checkpoints.
  assert 1 / summary['timing/steps_per_second'] >= 0.4
  assert 'waiting for data' in lines[-1] and 'step 5/5' in lines[-1]


@pytest.mark.parametrize('period', [1, 4])
def test_nonfinite_steps_are_read_in_groups_and_always_before_a_save(monkeypatch, period):
  model = testing.tiny_model()
  batch = testing.random_batch()
  t = _setup(model, batch, testing.nan_learning_rate(from_step=6))  # step 7 is the first NaN
  reads = []
  real_device_get = jax.device_get
  monkeypatch.setattr(jax, 'device_get', lambda x: reads.append(x) or real_device_get(x))

  def batches():
    while True:
      yield batch

  saves = _SlowSaves(0.0, period=5)
  with pytest.raises(TrainingError, match='NaN or infinite at step 7;'):
    trainer.run_training(t, batches(), 0, 12, saves, summary_period=100, log_every_secs=1e9,
                         finite_check_period=period)
  assert saves.saved == [5]  # step 7 is found before step 10 is saved
  # Flags are read in groups, leaving the newest step running; the save at step 5 reads step 5.
  flag_reads = [len(x) for x in reads if isinstance(x, list)]
  assert flag_reads == ([1] * 7 if period == 1 else [4, 1, 4])


@pytest.mark.parametrize('skip_nonfinite', [False, True])
def test_a_step_with_nan_gradients_leaves_the_parameters_unchanged(skip_nonfinite):
  model = testing.tiny_model(optimizer_def=optimizers.Adafactor())
  batch = testing.random_batch()
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 1e-2),
             skip_nonfinite=skip_nonfinite)
  t.train_step(batch)
  before = jax.device_get(t.train_state)
  weights = np.array(batch['decoder_loss_weights'], np.float32)
  weights[0, 0] = np.nan
  metrics = t.train_step(dict(batch, decoder_loss_weights=weights))
  assert float(metrics[trainer.NONFINITE].compute()) == 1.0
  after = jax.device_get(t.train_state)
  assert int(after.step) == int(before.step) + 1
  kept = (before.params, before.opt_state) if skip_nonfinite else before.params
  now = (after.params, after.opt_state) if skip_nonfinite else after.params
  for old, new in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(now)):
    np.testing.assert_array_equal(old, new)
  t.train_step(batch)  # the next finite step updates them again
  kernel = lambda params: params['decoder']['logits_dense']['kernel']
  assert not np.array_equal(kernel(jax.device_get(t.train_state.params)), kernel(after.params))


@pytest.mark.parametrize('optimizer_def', [optimizers.Adafactor(), optimizers.AdamW()])
def test_the_step_writes_parameters_in_place_without_copying_them_first(optimizer_def):
  model = testing.tiny_model(optimizer_def=optimizer_def)
  batch = testing.random_batch()
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 1e-2))
  hlo = t._partitioner.compile(t._step_fn, t.train_state, batch, t._rng).as_text()
  parameters = re.findall(r'%(state_params\S+) = \S+ parameter\(', hlo)
  copied = [name for name in re.findall(r' copy\(%([^)]+)\)', hlo) if name in parameters]
  assert len(parameters) > 10
  assert not copied, copied[:5]


def test_finite_check_period_must_be_positive():
  model = testing.tiny_model()
  batch = testing.random_batch()
  t = _setup(model, batch, optimizers.create_learning_rate_scheduler('constant', 1e-3))
  with pytest.raises(UserError, match='finite_check_period must be at least 1'):
    trainer.run_training(t, iter([batch]), 0, 1, None, summary_period=1, finite_check_period=0)


def test_compiler_options_reach_xla_and_the_partitioners_own_win():
  from jax.sharding import PartitionSpec
  bad = {'xla_cpu_scheduler_type': 'NO_SUCH_SCHEDULER'}
  partitioner = partitioning.PjitPartitioner()
  replicated = partitioner.sharding(PartitionSpec())
  double = partitioner.partition(lambda x: x * 2, replicated, replicated, compiler_options=bad)
  with pytest.raises(Exception, match='NO_SUCH_SCHEDULER'):
    double(jnp.ones(3))
  options = partitioner.train_step_compiler_options()
  assert options == partitioning.TRAIN_STEP_COMPILER_OPTIONS['cpu']  # these tests run on CPU
  partitioner = partitioning.PjitPartitioner(compiler_options=options)
  double = partitioner.partition(lambda x: x * 2, replicated, replicated, compiler_options=bad)
  np.testing.assert_array_equal(double(jnp.ones(3)), [2.0, 2.0, 2.0])
