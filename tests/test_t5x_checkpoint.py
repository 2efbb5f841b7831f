"""Checkpoints written by T5X itself load into t5train and reproduce T5X's logits."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from t5train import hf_interop, network, t5x_checkpoint, testing
from t5train.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(REPO, '..', 'shared', 'testdata', 't5x_tiny_v1_1')
if not os.path.isdir(TESTDATA):
  pytest.skip(f'T5X test checkpoints not found at {TESTDATA}', allow_module_level=True)

FORMATS = {
    'native': os.path.join(TESTDATA, 't5x_checkpoint', 'checkpoint_2'),
    'orbax': os.path.join(TESTDATA, 't5x_orbax_checkpoint', 'checkpoint_2'),
}
CONFIG = network.T5Config(
    vocab_size=320, dtype=jnp.float32, emb_dim=32, num_heads=4, num_encoder_layers=2,
    num_decoder_layers=2, head_dim=8, mlp_dim=64, mlp_activations=('gelu', 'linear'),
    dropout_rate=0.0, logits_via_embedding=False)

# Compiled once for both formats: faster than running the network op by op.
_apply = jax.jit(lambda p, *batch: network.Transformer(CONFIG).apply(
    {'params': p}, *batch, enable_dropout=False))


@pytest.fixture(scope='module')
def params() -> dict:
  return {name: t5x_checkpoint.read_t5x_params(path) for name, path in FORMATS.items()}


@pytest.fixture(scope='module')
def meta() -> dict:
  with open(os.path.join(TESTDATA, 'meta.json')) as f:
    return json.load(f)


@pytest.mark.parametrize('fmt', sorted(FORMATS))
def test_logits_match_t5x(params, fmt):
  ref = np.load(os.path.join(TESTDATA, 'reference_logits.npz'))
  logits = _apply(hf_interop.nest(params[fmt]), ref['encoder_input_tokens'],
                 ref['decoder_input_tokens'], ref['decoder_target_tokens'])
  assert logits.shape == ref['logits'].shape
  mask = ref['decoder_loss_weights'] > 0
  assert mask.any()
  testing.assert_trees_close(np.asarray(logits)[mask], ref['logits'][mask])


def test_formats_agree_and_match_meta(params, meta):
  native, orbax = params['native'], params['orbax']
  assert sorted(native) == sorted(orbax) == sorted(meta['param_shapes'])
  for key, shape in meta['param_shapes'].items():
    assert native[key].dtype == orbax[key].dtype == np.float32, key
    assert list(native[key].shape) == shape, key
    assert np.array_equal(native[key], orbax[key]), key
  for path in FORMATS.values():
    assert t5x_checkpoint.read_t5x_step(path) == meta['step'] == 2


def test_layout_matches_t5train_init(params):
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: network.Transformer(CONFIG).init(
      jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  flat = traverse_util.flatten_dict(nn.unbox(shapes['params']), sep='/')
  assert {key: leaf.shape for key, leaf in flat.items()} == {
      key: value.shape for key, value in params['native'].items()}


def test_nest():
  a, b = np.zeros(1), np.ones(2)
  assert hf_interop.nest({'x/y/z': a, 'x/w': b, 'v': a}) == {'x': {'y': {'z': a}, 'w': b}, 'v': a}


def test_not_a_checkpoint(tmp_path):
  (tmp_path / 'notes.txt').write_text('not a checkpoint')
  for read in (t5x_checkpoint.read_t5x_params, t5x_checkpoint.read_t5x_step):
    with pytest.raises(UserError, match=str(tmp_path)):
      read(str(tmp_path))
  with pytest.raises(UserError, match='does not exist'):
    t5x_checkpoint.read_t5x_params(str(tmp_path / 'missing'))


def test_corrupt_native_checkpoint(tmp_path):
  bad_msgpack = tmp_path / 'bad_msgpack'
  bad_msgpack.mkdir()
  (bad_msgpack / 'checkpoint').write_bytes(b'\xc1 not msgpack')
  with pytest.raises(UserError, match=str(bad_msgpack)):
    t5x_checkpoint.read_t5x_params(str(bad_msgpack))

  # A copy whose msgpack names an array directory that is not there.
  missing_array = tmp_path / 'checkpoint_2'
  shutil.copytree(FORMATS['native'], missing_array,
                  ignore=shutil.ignore_patterns('target.encoder.layers_0.mlp.wo.kernel'))
  for root, dirs, _ in os.walk(missing_array):  # The test data is read-only; let tmp_path be cleaned.
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o755)
  os.chmod(missing_array, 0o755)
  with pytest.raises(UserError, match='encoder/layers_0/mlp/wo/kernel'):
    t5x_checkpoint.read_t5x_params(str(missing_array))
