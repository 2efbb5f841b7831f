"""T5X's gin files in T5X's idiom (``from t5x import ...``, ``import __main__ as train_script``,
``include 't5x/...'``) build t5train's objects; the real t5x wins when it is installed."""

import os
import subprocess
import sys
import textwrap

import pytest

import gin
from t5train import checkpoints, gin_utils, network, t5x_compat
from t5train import decoding as t5train_decoding
from t5train import train as train_module
from t5train.errors import UserError
from tests.binaries import REPO, read_scalars, run_train

# A T5X user's experiment file: T5X's run and model files by their T5X paths, the built-in
# offline task, and T5X-style overrides.
EXPERIMENT = """
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import partitioning
from t5x import trainer
from t5x import utils
from t5x.examples.t5 import network

include 't5x/configs/runs/pretrain.gin'
include 't5x/examples/t5/t5_1_1/tiny.gin'
include 'tasks/demo.gin'

MODEL_DIR = '{model_dir}'
TRAIN_STEPS = 2
DROPOUT_RATE = 0.0
RANDOM_SEED = 0
USE_CACHED_TASKS = False
BATCH_SIZE = 8
network.T5Config.dtype = 'float32'
train_script.train:
  eval_steps = 1
  actions = {{'TRAIN_EVAL': [@trainer.TerminateOnNanAction()]}}
trainer.TerminateOnNanAction.task = %MIXTURE_OR_TASK_NAME
trainer.Trainer.num_microbatches = 0
utils.SaveCheckpointConfig.period = 4
utils.create_learning_rate_scheduler.warmup_steps = 100
partitioning.PjitPartitioner.model_parallel_submesh = (1, 1, 1, 1)
"""


@pytest.fixture
def t5x_gin():
  """Gin parsed as the train binary does it (``__main__`` is t5train.train), then restored."""
  main = sys.modules['__main__']
  gin.clear_config()
  t5x_compat.prepare_binary('t5train.train')
  yield
  sys.modules['__main__'] = main
  gin.clear_config()


def _train_arguments(monkeypatch):
  """The arguments the configured train hands t5train's train function."""
  received = {}
  monkeypatch.setattr(train_module.train, 't5train_function', lambda **kw: received.update(kw))
  gin.get_configurable(train_module.train)()
  return received


def test_t5x_files_build_t5train_objects(t5x_gin, tmp_path, monkeypatch):
  path = tmp_path / 'experiment.gin'
  path.write_text(EXPERIMENT.format(model_dir=tmp_path / 'model'))
  gin_utils.parse_gin([str(path)], ['train.eval_period = 7'])
  args = _train_arguments(monkeypatch)
  # --gin.train.eval_period reaches the function that runs, through import __main__.
  assert args['eval_period'] == 7 and args['total_steps'] == 2 and args['eval_steps'] == 1
  # utils.CheckpointConfig(save=..., restore=RestoreCheckpointConfig(path=[])): save only.
  save = args['checkpoint_cfg']
  assert isinstance(save, checkpoints.SaveCheckpointConfig)
  assert (save.period, save.save_dataset, save.dtype) == (4, False, 'float32')
  assert args.get('restore_checkpoint_cfg') is None
  # trainer.Trainer's settings, and T5X's learning-rate schedule of pretrain.gin.
  assert args['num_microbatches'] is None
  assert float(args['learning_rate_fn'](400)) == pytest.approx(1 / 20)
  model = args['model']
  assert model.decode_fn.__name__ == 'beam_search'  # T5X's default decoding
  config = model.module.config
  assert isinstance(config, network.T5Config)
  assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim,
          config.vocab_size, config.dtype) == (8, 4, 3, 16, 32128, 'float32')
  assert tuple(config.mlp_activations) == ('gelu', 'linear')
  assert model.optimizer_def.decay_rate == 0.8
  train_cfg, eval_cfg = args['train_dataset_cfg'], args['train_eval_dataset_cfg']
  assert (train_cfg.mixture_or_task_name, train_cfg.split, train_cfg.batch_size,
          train_cfg.pack, train_cfg.use_cached) == ('sort_digits', 'train', 8, True, False)
  assert (eval_cfg.split, eval_cfg.seed, eval_cfg.shuffle) == ('validation', 42, False)
  assert args['partitioner'].num_model_partitions == 1


def test_scalable_and_decoder_only_model_files(t5x_gin):
  gin_utils.parse_gin([], [
      'from __gin__ import dynamic_registration', 'import seqio',
      "include 't5x/examples/scalable_t5/mt5/small.gin'", 'DROPOUT_RATE = 0.0',
      'VOCABULARY = @seqio.ByteVocabulary()'])
  config = gin.query_parameter('%MODEL').scoped_configurable_fn().module.config
  assert config.scan_layers and config.remat_policy == 'dots_saveable'  # T5X's 'minimal'
  assert (config.emb_dim, config.vocab_size) == (512, 250112)
  gin.clear_config()
  gin_utils.parse_gin([], [
      'from __gin__ import dynamic_registration', 'import seqio',
      "include 't5x/examples/decoder_only/models/base.gin'", 'DROPOUT_RATE = 0.0',
      'VOCABULARY = @seqio.ByteVocabulary()'])
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  assert model.module.config.num_encoder_layers == 0
  assert model.module.config.num_decoder_layers == 12 and model.module.config.logits_via_embedding
  assert gin.get_bindings('decoding.temperature_sample')['topk'] == 40


def test_t5x_arguments_honoured_accepted_or_refused():
  from t5x import adafactor, partitioning, utils  # pylint: disable=g-import-not-at-top
  from t5x.examples.scalable_t5 import network as scalable  # pylint: disable=g-import-not-at-top
  assert t5x_compat.install_t5x_names()
  cfg = utils.DatasetConfig('sort_digits', {'inputs': 8, 'targets': 8}, 'train', 4, False, 1,
                            use_custom_packing_ops=True, use_memory_cache=False)
  assert (cfg.batch_size, cfg.seed) == (4, 1)
  with pytest.raises(UserError, match='trim_output_features'):
    utils.DatasetConfig('sort_digits', None, 'test', 4, False, 1, trim_output_features=False)
  assert utils.RestoreCheckpointConfig(path=[]).path is None
  assert utils.RestoreCheckpointConfig(path=['/ckpt/checkpoint_5']).path == '/ckpt/checkpoint_5'
  with pytest.raises(UserError, match='one path'):
    utils.RestoreCheckpointConfig(path=['/a', '/b'])
  with pytest.raises(UserError, match='checkpointer_cls'):
    utils.RestoreCheckpointConfig(path='/a', checkpointer_cls=object)
  save = utils.SaveCheckpointConfig(period=3, keep=2, keep_dataset_checkpoints=1,
                                    save_dataset=True, checkpoint_steps=[5], dtype=None)
  assert (save.period, save.keep, save.steps, save.save_dataset, save.dtype) == (
      3, 2, (5,), True, 'float32')
  assert scalable.T5Config(vocab_size=8, remat_policy='full', param_scan_axis=0).remat_policy == 'full'
  with pytest.raises(UserError, match='remat_policy'):
    scalable.T5Config(vocab_size=8, remat_policy='everything')
  partitioner = partitioning.PjitPartitioner(num_partitions=2, model_parallel_submesh=(1, 1, 1, 1))
  assert partitioner.num_model_partitions == 1  # the submesh wins, as in T5X
  with pytest.raises(UserError, match='params_on_devices'):
    partitioning.PjitPartitioner(num_partitions=1, params_on_devices=False)
  assert partitioning.standard_logical_axis_rules(additional_rules=[('x', 'model')])[-1] == (
      'x', 'model')
  clipped = adafactor.Adafactor(beta1=0.9, factored=False, global_norm_clip_threshold=1.0,
                                logical_factor_rules=adafactor.standard_logical_factor_rules())
  assert clipped.max_norm == 1.0 and clipped.optimizer.beta1 == 0.9
  with pytest.raises(UserError, match='epsilon2'):
    adafactor.Adafactor(epsilon2=1e-2)
  with pytest.raises(UserError, match=r'multiply_by_parameter_scale = HParamMap.*not supported'):
    adafactor.Adafactor(multiply_by_parameter_scale=adafactor.HParamMap([('.*', False)]))


def test_t5x_train_arguments_refused_with_reason(t5x_gin, tmp_path, monkeypatch):
  path = tmp_path / 'experiment.gin'
  path.write_text(EXPERIMENT.format(model_dir=tmp_path / 'model'))
  gin_utils.parse_gin([str(path)], ['train.run_eval_before_training = True'])
  with pytest.raises(UserError, match='run_eval_before_training'):
    _train_arguments(monkeypatch)
  gin.clear_config()
  gin_utils.parse_gin([str(path)], ['train.relative_steps = 5', 'train.use_hardware_rng = True',
                                    'train.gc_period = 10'])
  assert _train_arguments(monkeypatch)['total_steps'] == 5  # no checkpoint yet: from step 0


def test_beam_search_settings_reach_t5train_decoder(monkeypatch):
  from t5x import decoding  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(t5train_decoding, 'beam_search', lambda *a, **kw: seen.update(kw))
  decoding.beam_search(None, None, 2, 4, 1, num_decodes=3, alpha=0.2, min_log_prob=-5.0)
  assert (seen['num_decodes'], seen['alpha']) == (3, 0.2)
  with pytest.raises(UserError, match='max_decode_len'):
    decoding.beam_search(None, None, 2, 4, 1, max_decode_len=3)


def test_installed_t5x_is_used_instead(tmp_path):
  fake = tmp_path / 't5x'
  fake.mkdir()
  (fake / '__init__.py').write_text('REAL = True\n')
  code = textwrap.dedent("""
      from t5train import t5x_compat
      assert not t5x_compat.install_t5x_names()
      import t5x
      print(t5x.REAL, t5x_compat.gin_search_paths())
  """)
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), REPO])}
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['True', f"['{tmp_path}']"]


def test_train_binary_runs_t5x_style_files(tmp_path):
  """One binary launch: T5X's idiom end to end, --gin.train.eval_period through __main__."""
  model_dir = tmp_path / 'model'
  path = tmp_path / 'experiment.gin'
  path.write_text(EXPERIMENT.format(model_dir=model_dir))
  result = run_train(f'--gin_file={path}', '--gin.train.eval_period=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (model_dir / 'checkpoint_2').is_dir() and (model_dir / 'config.gin').is_file()
  steps = set()
  for root, _, files in os.walk(model_dir / 'training_eval'):
    if any(name.startswith('events.out.tfevents') for name in files):
      for values in read_scalars(root).values():
        steps.update(step for step, _ in values)
  assert steps == {1, 2}  # evaluated every step: eval_period=1, not pretrain.gin's 1000
  assert 'import __main__ as train_script' in (model_dir / 'config.gin').read_text()

  # The run's config.gin binds train_script.train through __main__; infer takes it too.
  main = sys.modules['__main__']
  gin.clear_config()
  try:
    t5x_compat.prepare_binary('t5train.infer')
    gin_utils.parse_gin(['gin/runs/infer.gin', str(model_dir / 'config.gin')],
                        [f"CHECKPOINT_PATH = '{model_dir}'", f"INFER_OUTPUT_DIR = '{tmp_path}'"],
                        search_paths=[REPO])
    assert gin.query_parameter('%TRAIN_STEPS') == 2  # bound through train_script.train
  finally:
    sys.modules['__main__'] = main
    gin.clear_config()


@pytest.mark.parametrize('binary, run, output', [
    ('t5train.infer', 'infer.gin', 'INFER_OUTPUT_DIR'),
    ('t5train.eval', 'eval.gin', 'EVAL_OUTPUT_DIR')])
def test_t5x_infer_and_eval_files_read_the_split_macro(binary, run, output):
  """T5X's infer.gin and eval.gin read the split from MIXTURE_OR_TASK_SPLIT ('test')."""
  main = sys.modules['__main__']
  gin.clear_config()
  try:
    t5x_compat.prepare_binary(binary)
    files = [f't5x/configs/runs/{run}', 't5x/examples/t5/t5_1_1/tiny.gin', 'tasks/demo.gin']
    bindings = ["CHECKPOINT_PATH = '/unused'", f"{output} = '/unused'", 'DROPOUT_RATE = 0.0']
    gin_utils.parse_gin(files, bindings, search_paths=[REPO])
    from t5x import utils  # noqa: PLC0415  (t5train's stand-in, registered by prepare_binary)
    assert gin.get_configurable(utils.DatasetConfig)().split == 'test'
    gin.clear_config()
    t5x_compat.prepare_binary(binary)
    gin_utils.parse_gin(files, [*bindings, "MIXTURE_OR_TASK_SPLIT = 'validation'"],
                        search_paths=[REPO])
    assert gin.get_configurable(utils.DatasetConfig)().split == 'validation'
  finally:
    sys.modules['__main__'] = main
    gin.clear_config()
