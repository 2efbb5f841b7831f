"""T5X checkpoints read as they are wherever t5train reads a checkpoint: inference parameters,
a training start (INITIAL_CHECKPOINT_PATH), InteractiveModel, T5X's LegacyCheckpointManager and
the infer binary (on a gs:// bucket), from checkpoints T5X itself wrote
(../shared/testdata/t5x_tiny_v1_1) in its native and Orbax formats, and a scanned one re-saved
from them. Nothing converted is written."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from binaries import run_binary
from t5x_testdata import T5X_DATA, T5X_MODEL_DIRS, reference, scanned_t5x_checkpoint

from t5train import (
  checkpoint_reading,
  checkpoints,
  convert,
  inference,
  legacy_checkpoints,
  optimizers,
  partitioning,
  t5x_checkpoint,
  testing,
)
from t5train.errors import UserError

if not os.path.isdir(T5X_DATA):
  pytest.skip(f'T5X test checkpoints not found at {T5X_DATA}', allow_module_level=True)

NATIVE = os.path.join(T5X_MODEL_DIRS['native'], 'checkpoint_2')
ORBAX = os.path.join(T5X_MODEL_DIRS['orbax'], 'checkpoint_2')
# The T5X checkpoint's network (its README): T5 1.1, 2+2 layers, 32 wide, 4 heads of 8.
CONFIG = testing.tiny_config(vocab_size=320, emb_dim=32, num_heads=4, mlp_dim=64)
LENGTHS = {'inputs': 24, 'targets': 12}


def model(**config_overrides):
  return testing.tiny_model(testing.tiny_config(**{**CONFIG.__dict__, **config_overrides}),
                            optimizers.Adafactor(decay_rate=0.8, step_offset=0))


def initializer(**config_overrides):
  return inference.params_initializer(model(**config_overrides), partitioning.PjitPartitioner(),
                                      4, LENGTHS)


@functools.cache
def t5x_params():
  """The T5X checkpoint's parameters as ``t5x_checkpoint`` reads them (host float32)."""
  return t5x_checkpoint.read_t5x_params(NATIVE)


@functools.cache
def _logits_fn(scan_layers):
  module = model(scan_layers=scan_layers).module
  return jax.jit(lambda params, *batch: module.apply({'params': params}, *batch,
                                                     enable_dropout=False))


def assert_t5x_logits(params, scan_layers):
  ref = reference()
  logits = np.asarray(_logits_fn(scan_layers)(params, ref['encoder_input_tokens'],
                                              ref['decoder_input_tokens'],
                                              ref['decoder_target_tokens']))
  real = ref['decoder_loss_weights'] > 0
  testing.assert_trees_close(logits[real], ref['logits'][real])


@pytest.fixture(scope='module')
def scanned(tmp_path_factory):
  """The T5X checkpoint as T5X's scanned models save it; named as no checkpoint_<step> is."""
  return scanned_t5x_checkpoint(tmp_path_factory.mktemp('t5x') / 'scanned_t5x', False)


@pytest.mark.parametrize('source,scan_layers', [('native', False), ('orbax', False),
                                                ('scanned', False), ('orbax', True),
                                                ('scanned', True)])
def test_restored_parameters_give_t5x_logits(source, scan_layers, scanned):
  path = {'native': NATIVE, 'orbax': ORBAX, 'scanned': scanned}[source]
  init = initializer(scan_layers=scan_layers)
  params = checkpoint_reading.restore_params(path, init)
  shardings = init.train_state_shardings.params
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda leaf, sharding: leaf.sharding == sharding and leaf.dtype == jnp.float32,
      params, shardings))
  assert_t5x_logits(params, scan_layers)
  if not scan_layers:  # pure data movement: T5X's arrays, bit for bit
    testing.assert_trees_equal(dict(checkpoint_reading.flatten_with_names(params)), t5x_params())


def test_t5x_checkpoints_are_found_and_never_taken_for_t5train_ones(tmp_path, scanned):
  for model_dir, path in zip(T5X_MODEL_DIRS.values(), (NATIVE, ORBAX)):
    assert checkpoint_reading.is_t5x_checkpoint(path) and checkpoint_reading.is_checkpoint_dir(path)
    for mode, where in (('specific', path), ('latest', path), ('latest', model_dir),
                        ('all', model_dir)):
      assert checkpoints.select_checkpoints(
          checkpoints.RestoreCheckpointConfig(path=where, mode=mode)) == [(2, path)]
    with pytest.raises(UserError, match="is not a checkpoint directory \\(mode='specific'\\)"):
      checkpoints.select_checkpoints(checkpoints.RestoreCheckpointConfig(path=model_dir,
                                                                         mode='specific'))
  # A T5X checkpoint renamed by hand says its own step.
  assert checkpoint_reading.find_checkpoints(scanned) == [(2, scanned)]

  # A t5train checkpoint (with the same parameters) is not T5X's, nor is its model directory.
  ours = checkpoints.save_params(str(tmp_path / 'ours'), t5x_params_nested(), step=2)
  assert not checkpoint_reading.is_t5x_checkpoint(ours)
  assert not checkpoint_reading.is_t5x_checkpoint(str(tmp_path / 'ours'))
  assert t5x_checkpoint.checkpoint_format(os.path.join(ours, 'state')) is None

  # In a T5X model directory, T5X's unfinished saves (its temporary directories, or a
  # checkpoint_<step> without the msgpack file T5X writes last) are not checkpoints.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  (mixed / 'checkpoint_2').symlink_to(NATIVE)
  (mixed / 'checkpoint_4.tmp-1700000000').mkdir()
  (mixed / 'checkpoint_6').mkdir()
  (mixed / 'checkpoint_6' / 'target.decoder.decoder_norm.scale').mkdir()
  assert checkpoint_reading.find_checkpoints(str(mixed)) == [(2, str(mixed / 'checkpoint_2'))]


def t5x_params_nested():
  from t5train import hf_interop
  return hf_interop.nest(t5x_params())


def test_fine_tuning_from_a_t5x_checkpoint_equals_fine_tuning_from_its_converted_copy(tmp_path):
  converted = convert.import_t5x(NATIVE, str(tmp_path / 'converted'))
  batch = {name: value for name, value in reference().items() if name != 'logits'}
  schedule = optimizers.create_learning_rate_scheduler('constant * rsqrt_decay', 0.01,
                                                       warmup_steps=1)
  losses, opt_states = {}, {}
  for name, path in (('t5x', NATIVE), ('converted', converted)):
    trainer = testing.tiny_trainer(
        model(), batch, schedule,
        restore_cfg=checkpoints.RestoreCheckpointConfig(path=path, mode='specific')).trainer
    assert int(trainer.train_state.step) == 2  # T5X's fine-tunes count from the checkpoint's step
    opt_states[name] = jax.device_get(trainer.train_state.opt_state)
    losses[name] = [float(trainer.train_step(batch)['loss'].compute()) for _ in range(3)]
    assert int(trainer.train_state.step) == 5
  # The same parameters, a fresh optimizer, the same step: the same run, step for step.
  testing.assert_trees_equal(opt_states['t5x'], opt_states['converted'])
  assert losses['t5x'] == losses['converted'], losses
  assert losses['t5x'][2] < losses['t5x'][0]


def test_assignment_map_dtype_and_mismatches(tmp_path):
  init = initializer()
  fresh = dict(checkpoint_reading.flatten_with_names(
      init.from_scratch(jax.random.PRNGKey(3)).params))
  state = checkpoint_reading.restore_from_path(
      ORBAX, init, assignment_map=((r'decoder/logits_dense/kernel', None),),
      init_rng=jax.random.PRNGKey(3))
  assert int(state.step) == 2
  restored = dict(checkpoint_reading.flatten_with_names(state.params))
  testing.assert_trees_equal(restored.pop('decoder/logits_dense/kernel'),
                             fresh['decoder/logits_dense/kernel'])
  testing.assert_trees_equal(restored, {name: value for name, value in t5x_params().items()
                                        if name != 'decoder/logits_dense/kernel'})

  # dtype: inference keeps the parameters in it; a training start rounds them to it and keeps
  # the model's float32 for the optimizer.
  rounded = {name: value.astype(jnp.bfloat16) for name, value in t5x_params().items()}
  params = checkpoint_reading.restore_params(NATIVE, init, dtype='bfloat16')
  testing.assert_trees_equal(dict(checkpoint_reading.flatten_with_names(params)), rounded)
  state = checkpoint_reading.restore_from_path(NATIVE, init, dtype='bfloat16')
  trained = dict(checkpoint_reading.flatten_with_names(state.params))
  assert {value.dtype for value in trained.values()} == {jnp.dtype(jnp.float32)}
  testing.assert_trees_equal(trained, {name: value.astype(np.float32)
                                       for name, value in rounded.items()})
  with pytest.raises(UserError, match="RestoreCheckpointConfig.dtype must be a floating-point "
                                      "dtype such as 'float32' or 'bfloat16'"):
    checkpoint_reading.restore_params(NATIVE, init, dtype='int8')

  # The model and the checkpoint disagree: the same errors as for t5train checkpoints.
  with pytest.raises(UserError, match=f"{NATIVE}: its vocabulary has 320 entries but the "
                                      "model's has 256"):
    checkpoint_reading.restore_params(NATIVE, initializer(vocab_size=256))
  with pytest.raises(UserError, match=f'{ORBAX} has no parameter encoder/layers_2/'):
    checkpoint_reading.restore_from_path(ORBAX, initializer(num_encoder_layers=3))
  with pytest.raises(UserError, match=r'parameter (en|de)coder/layers_0/mlp/wi_0/kernel has shape '
                                      r'\(32, 64\) but the model expects \(32, 128\)'):
    checkpoint_reading.restore_params(NATIVE, initializer(mlp_dim=128))


def test_interactive_model_and_legacy_checkpoint_manager_read_t5x_checkpoints(tmp_path):
  import seqio

  from t5train import interactive_model, models
  t5x_model = models.EncoderDecoderModel(
      model().module, seqio.ByteVocabulary(), seqio.ByteVocabulary(),
      optimizers.Adafactor(decay_rate=0.8, step_offset=0))
  im = interactive_model.InteractiveModel(
      batch_size=4, task_feature_lengths=LENGTHS, output_dir=str(tmp_path / 'im'),
      partitioner=partitioning.PjitPartitioner(num_partitions=1), model=t5x_model,
      checkpoint_path=T5X_MODEL_DIRS['orbax'], restore_mode='latest')
  assert im.step == 2
  testing.assert_trees_equal(dict(checkpoint_reading.flatten_with_names(im.train_state.params)),
                             t5x_params())

  init = initializer()
  config = checkpoints.RestoreCheckpointConfig(path=NATIVE, mode='specific', dtype='bfloat16')
  manager = legacy_checkpoints.LegacyCheckpointManager(None, config,
                                                       init.global_train_state_shape)
  fallback = init.from_scratch(jax.random.PRNGKey(0)).state_dict()
  state = manager.restore([NATIVE], config, fallback)
  assert int(state.step) == 2
  testing.assert_trees_equal(
      dict(checkpoint_reading.flatten_with_names(state.params)),
      {name: value.astype(jnp.bfloat16).astype(np.float32) for name, value in t5x_params().items()})
  with pytest.raises(UserError, match='has no optimizer state for this optimizer'):
    manager.restore([NATIVE], config)


_UPLOAD = """
import os, sys
from google.cloud import storage
bucket = storage.Client(project='test').bucket(sys.argv[1])
for base, _, files in os.walk(sys.argv[2]):
  for name in files:
    path = os.path.join(base, name)
    bucket.blob(os.path.relpath(path, os.path.dirname(sys.argv[2]))).upload_from_filename(path)
"""


def test_infer_binary_scores_with_a_t5x_model_directory_on_a_bucket(tmp_path):
  """The infer binary given T5X's own model directory (native format) on gs://, served by
  tests/gcs_emulator.py: the newest checkpoint is found, read in place, and scores as T5X's
  parameters do in this process."""
  import shutil
  import subprocess
  import sys

  import gcs_emulator
  if not shutil.which('openssl'):
    pytest.skip('the GCS emulator makes its TLS certificate with the openssl command')
  inputs = tmp_path / 'inputs.tsv'
  rows = [('9876', '6789'), ('5512', '1255'), ('301', '013')]
  inputs.write_text(''.join(f'{i}\t{t}\n' for i, t in rows))
  dims = [f'--gin.network.T5Config.{name}={getattr(CONFIG, name)}'
          for name in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim')]
  with gcs_emulator.serve('t5x-bucket') as env:
    upload = subprocess.run([sys.executable, '-c', _UPLOAD, 't5x-bucket', T5X_MODEL_DIRS['native']],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert upload.returncode == 0, upload.stderr[-3000:]
    model_dir = f'gs://t5x-bucket/{os.path.basename(T5X_MODEL_DIRS["native"])}'
    result = run_binary(
        't5train.infer', '--gin_file=gin/models/t5_1_1/tiny.gin', *dims,
        '--gin_file=gin/runs/infer.gin', '--gin_file=gin/tasks/demo.gin',
        f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.INFER_OUTPUT_DIR='{tmp_path}'",
        f"--gin.INPUT_FILE='{inputs}'", "--gin.infer_script.infer.mode='score'",
        f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}', '--gin.BATCH_SIZE=4', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Restored step 2 from {model_dir}/checkpoint_2' in result.stderr
  assert sorted(os.listdir(tmp_path)) == ['inputs.tsv', 'inputs.tsv-score.jsonl']
  with open(tmp_path / 'inputs.tsv-score.jsonl') as f:
    scores = [json.loads(line)['score'] for line in f]

  # The same scores from T5X's parameters in this process (byte vocabulary: byte + 3, EOS 1).
  m = model()
  encode = lambda text: [b + 3 for b in text.encode()] + [1]
  features = [m.example_features({'inputs': encode(i), 'targets': encode(t)}, LENGTHS)
              for i, t in rows]
  batch = {name: np.stack([f[name] for f in features]) for name in features[0]}
  expected = np.asarray(m.score_batch(t5x_params_nested(), batch))
  testing.assert_trees_close(np.asarray(scores, np.float32), expected)
