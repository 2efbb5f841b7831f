"""Converting weights: Hugging Face -> t5train -> Hugging Face, T5X -> t5train, and bad input."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import hf_models  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from binaries import run_binary  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from t5x_testdata import save_as_t5x as _save_as_t5x  # noqa: E402
from t5x_testdata import scanned_t5x_checkpoint as _scanned_t5x_checkpoint  # noqa: E402

import gin  # noqa: E402
from t5train import (  # noqa: E402
  checkpoints,
  convert,
  gin_utils,
  hf_interop,
  models,
  network,
  optimizers,
  testing,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from t5train.errors import UserError  # noqa: E402

T5X_DATA = os.path.join(REPO, '..', 'shared', 'testdata', 't5x_tiny_v1_1')
T5X_DECODER_ONLY = os.path.join(REPO, 'tests', 'testdata', 't5x_decoder_only', 'reference.npz')


def _t5train_logits(config, flat, encoder, decoder_inputs, targets):
  return np.asarray(network.Transformer(config).apply(
      {'params': hf_interop.nest(flat)}, jnp.asarray(encoder), jnp.asarray(decoder_inputs),
      jnp.asarray(targets), enable_dropout=False))


@pytest.mark.parametrize('name', sorted(hf_models.FAMILIES) + sorted(hf_models.TIED))
def test_hf_round_trip(name, tmp_path):
  hf = hf_models.hf_model(name)
  hf.save_pretrained(tmp_path / 'hf')
  if name in hf_models.TIED:  # what transformers 5 writes for a tied output layer
    assert 'lm_head.weight' not in load_file(str(tmp_path / 'hf' / 'model.safetensors'))
    assert json.load(open(tmp_path / 'hf' / 'config.json'))['tie_word_embeddings'] is True
  checkpoint = convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'imported'))
  config = hf_models.t5train_config(name)
  assert hf_interop.t5_config_from_hf_config(
      json.load(open(tmp_path / 'hf' / 'config.json'))) == config.__class__(
          **{**config.__dict__, 'dtype': 'float32'})

  # The model.gin written beside the checkpoint configures the same network.
  gin.clear_config()
  gin_utils.parse_gin([str(tmp_path / 'imported' / 'model.gin')], [])
  assert gin.get_configurable(network.T5Config)() == config.__class__(
      **{**config.__dict__, 'dtype': 'float32'})
  gin.clear_config()

  # In: t5train reproduces transformers' logits from the converted checkpoint.
  flat = convert.read_checkpoint_params(checkpoint, config)
  encoder, decoder_inputs, targets = hf_models.random_batch(config.vocab_size)
  expected = hf_models.hf_logits(hf, encoder, decoder_inputs)
  logits = _t5train_logits(config, flat, encoder, decoder_inputs, targets)
  hf_models.assert_logits_close(logits, expected, targets)

  # Out: every tensor comes back bit for bit, and transformers loads the directory.
  convert.export_hf(checkpoint, config, str(tmp_path / 'exported'))
  exported = load_file(str(tmp_path / 'exported' / 'model.safetensors'))
  original = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  for _, hf_name in hf_interop.name_pairs(config):
    np.testing.assert_array_equal(exported[hf_name], original[hf_name], err_msg=hf_name)
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / 'exported')).eval()
  # The same weights through the same torch ops: the same logits, bit for bit.
  np.testing.assert_array_equal(hf_models.hf_logits(reloaded, encoder, decoder_inputs), expected)


def test_hf_output_layers_that_t5train_does_not_tie(tmp_path):
  """An lm_head.weight of its own under a config that scales the decoder's output (transformers
  5's T5Config default, then untied): the scale goes into t5train's untied kernel. A config that
  says tie_word_embeddings=false needs the tensor."""
  hf = hf_models.hf_model('v1_0_relu_tied')
  hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.2)
  hf.save_pretrained(tmp_path / 'hf')
  assert json.load(open(tmp_path / 'hf' / 'config.json'))['scale_decoder_outputs'] is True
  checkpoint = convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'imported'))
  config = dataclasses.replace(hf_models.t5train_config('v1_0_relu_tied'),
                               logits_via_embedding=False)
  assert 'logits_via_embedding = False' in open(tmp_path / 'imported' / 'model.gin').read()
  encoder, decoder_inputs, targets = hf_models.random_batch(config.vocab_size)
  expected = hf_models.hf_logits(hf, encoder, decoder_inputs)
  hf_models.assert_logits_close(_t5train_logits(
      config, convert.read_checkpoint_params(checkpoint, config), encoder, decoder_inputs,
      targets), expected, targets)
  convert.export_hf(checkpoint, config, str(tmp_path / 'exported'))
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / 'exported')).eval()
  hf_models.assert_logits_close(hf_models.hf_logits(reloaded, encoder, decoder_inputs), expected,
                                targets)

  hf_models.hf_model('umt5_tied').save_pretrained(tmp_path / 'tied')
  config_json = json.load(open(tmp_path / 'tied' / 'config.json'))
  json.dump({**config_json, 'tie_word_embeddings': False},
            open(tmp_path / 'tied' / 'config.json', 'w'))
  with pytest.raises(UserError, match=r'^the Hugging Face weights lack lm_head\.weight; they do '
                                      r'not match config\.json$'):
    convert.import_hf(str(tmp_path / 'tied'), str(tmp_path / 'untied'))
  assert not (tmp_path / 'untied').exists()


def test_fine_tuning_restores_converted_params_and_starts_the_optimizer_fresh(tmp_path):
  name = 'v1_1_gated_gelu_untied'
  hf = hf_models.hf_model(name)
  hf.save_pretrained(tmp_path / 'hf')
  checkpoint = convert.import_hf(str(tmp_path / 'hf'), str(tmp_path / 'imported'))
  config = hf_models.t5train_config(name)
  model = models.EncoderDecoderModel(network.Transformer(config), None, None, optimizers.AdamW(),
                                     loss_normalizing_factor='NUM_REAL_TARGET_TOKENS')
  encoder, decoder_inputs, targets = hf_models.random_batch(config.vocab_size)
  batch = {'encoder_input_tokens': encoder.astype(np.int32),
           'decoder_input_tokens': decoder_inputs.astype(np.int32),
           'decoder_target_tokens': targets.astype(np.int32),
           'decoder_loss_weights': (targets > 0).astype(np.float32)}
  t = testing.tiny_trainer(
      model, batch, optimizers.create_learning_rate_scheduler('constant'),
      restore_cfg=checkpoints.RestoreCheckpointConfig(path=checkpoint, mode='specific')).trainer
  # A fresh Adam state: step count and both moments all zero.
  assert all(float(jnp.abs(x).max()) == 0.0
             for x in jax.tree_util.tree_leaves(t.train_state.opt_state))
  first_loss = float(t.train_step(batch)['loss'].compute())
  with torch.no_grad():
    labels = torch.tensor(np.where(targets > 0, targets, -100))
    hf_loss = float(hf(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0),
                       decoder_input_ids=torch.tensor(decoder_inputs), labels=labels).loss)
  testing.assert_trees_close(first_loss, hf_loss)


@pytest.mark.skipif(not os.path.isdir(T5X_DATA), reason='T5X test checkpoint not present')
@pytest.mark.parametrize('fmt', ['t5x_checkpoint', 't5x_orbax_checkpoint'])
def test_t5x_import_reproduces_t5x_logits(fmt, tmp_path):
  checkpoint = convert.import_t5x(os.path.join(T5X_DATA, fmt, 'checkpoint_2'),
                                  str(tmp_path / 'out'))
  assert checkpoint.endswith('checkpoint_2')
  config = convert.t5_config_from_shapes(convert.read_checkpoint_params(
      checkpoint, network.T5Config(vocab_size=320, emb_dim=32, num_heads=4, num_encoder_layers=2,
                                   num_decoder_layers=2, head_dim=8, mlp_dim=64,
                                   mlp_activations=('gelu', 'linear'))))
  reference = np.load(os.path.join(T5X_DATA, 'reference_logits.npz'))
  flat = convert.read_checkpoint_params(checkpoint, config)
  logits = _t5train_logits(config, flat, reference['encoder_input_tokens'],
                           reference['decoder_input_tokens'], reference['decoder_target_tokens'])
  real = reference['decoder_loss_weights'] > 0
  testing.assert_trees_close(logits[real], reference['logits'][real])
  assert 'mlp_activations = (\'gelu\', \'linear\')' in open(tmp_path / 'out' / 'model.gin').read()


def _convert(*args):
  return run_binary('t5train.convert', *args)


def test_convert_binary_and_its_errors(tmp_path):
  hf = hf_models.hf_model('v1_0_relu_tied')
  hf.save_pretrained(tmp_path / 'hf')
  import seqio  # a SentencePiece model that ships with seqio stands in for a tokenizer
  spm = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                     'sentencepiece.model')
  shutil.copy(spm, tmp_path / 'hf' / 'spiece.model')
  result = _convert('--from=hf', f'--input={tmp_path / "hf"}', f'--output={tmp_path / "ok"}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'ok')) == ['checkpoint_0', 'model.gin', 'spiece.model']
  assert f"sentencepiece_model_file = '{tmp_path / 'ok' / 'spiece.model'}'" in open(
      tmp_path / 'ok' / 'model.gin').read()
  back = _convert('--to=hf', f'--input={tmp_path / "ok" / "checkpoint_0"}',
                  f'--gin_file={tmp_path / "ok" / "model.gin"}', f'--output={tmp_path / "back"}')
  assert back.returncode == 0, back.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'back')) == ['config.json', 'model.safetensors',
                                                   'spiece.model', 'tokenizer_config.json']

  config = json.load(open(tmp_path / 'hf' / 'config.json'))
  (tmp_path / 'bart').mkdir()
  json.dump({**config, 'model_type': 'bart'}, open(tmp_path / 'bart' / 'config.json', 'w'))
  (tmp_path / 'wide').mkdir()
  json.dump({**config, 'd_ff': 128}, open(tmp_path / 'wide' / 'config.json', 'w'))
  os.link(tmp_path / 'hf' / 'model.safetensors', tmp_path / 'wide' / 'model.safetensors')
  cases = [
      ((tmp_path / 'nowhere'), 'is not a directory'),
      ((tmp_path / 'ok'), 'no config.json'),
      ((tmp_path / 'bart'), "unsupported model_type 'bart'"),
      ((tmp_path / 'wide'), 'layers_0/mlp/wi/kernel has shape (32, 64) but the model '
                            'expects (32, 128)'),
  ]
  for source, message in cases:
    out = tmp_path / f'out_{source.name}'
    result = _convert('--from=hf', f'--input={source}', f'--output={out}')
    assert result.returncode == 2, (source, result.stderr[-2000:])
    assert message in result.stderr.strip().splitlines()[-1], result.stderr[-500:]
    assert 'Traceback' not in result.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


@pytest.mark.parametrize('name', ['causal', 'prefix'])
def test_t5x_decoder_only_import_reproduces_t5x_logits(name, tmp_path):
  """Parameters of T5X's own decoder-only network (tests/testdata/t5x_decoder_only), saved as
  T5X saves them, import with a model.gin whose MODEL computes T5X's logits."""
  with np.load(T5X_DECODER_ONLY) as arrays:
    items = {key[len(name) + 1:]: arrays[key] for key in arrays.files
             if key.startswith(f'{name}/')}
  flat = {key[len('params/'):]: value for key, value in items.items() if key.startswith('params/')}
  batch = {key[len('batch/'):]: value for key, value in items.items() if key.startswith('batch/')}
  checkpoint = convert.import_t5x(_save_as_t5x(tmp_path / 't5x', flat, step=7),
                                  str(tmp_path / 'imported'))
  assert os.path.basename(checkpoint) == 'checkpoint_7'
  gin.clear_config()
  # The causal LM's batch has no inputs region: T5X's causal attention throughout.
  gin_utils.parse_gin([str(tmp_path / 'imported' / 'model.gin')],
                      [f'INPUTS_BIDIRECTIONAL_ATTENTION = {name == "prefix"}'])
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  gin.clear_config()
  assert isinstance(model, models.DecoderOnlyModel)
  assert model.module.config.logits_via_embedding == (name == 'causal')
  params = hf_interop.nest(convert.read_checkpoint_params(checkpoint, model.module.config))
  logits = np.asarray(model.logits(params, {**batch, 'decoder_loss_weights': None}))
  real = batch['decoder_segment_ids'] > 0  # what padding rows hold is T5X's own business
  testing.assert_trees_close(logits[real], items['logits'][real], rtol=testing.SIMPLE_RTOL)


@pytest.mark.skipif(not os.path.isdir(T5X_DATA), reason='T5X test checkpoint not present')
def test_scanned_t5x_checkpoints_import_as_their_per_layer_weights(tmp_path):
  reference = np.load(os.path.join(T5X_DATA, 'reference_logits.npz'))
  batch = [reference[name] for name in ('encoder_input_tokens', 'decoder_input_tokens',
                                        'decoder_target_tokens')]
  real = reference['decoder_loss_weights'] > 0
  per_layer = convert.import_t5x(os.path.join(T5X_DATA, 't5x_checkpoint', 'checkpoint_2'),
                                 str(tmp_path / 'per_layer'))
  config = convert.t5_config_from_shapes(checkpoint_reading_flat(per_layer))
  expected = convert.read_checkpoint_params(per_layer, config)

  # Layers on T5X's scan axis, one table per stack: the per-layer import's weights, bit for bit.
  scanned = convert.import_t5x(_scanned_t5x_checkpoint(tmp_path / 't5x_scanned', False),
                               str(tmp_path / 'scanned'))
  testing.assert_trees_equal(convert.read_checkpoint_params(scanned, config), expected)

  # scalable_t5's table in every layer (copies of the stack's here): umT5's layout, same logits.
  layered = convert.import_t5x(_scanned_t5x_checkpoint(tmp_path / 't5x_layered', True),
                               str(tmp_path / 'layered'))
  layered_config = convert.t5_config_from_shapes(checkpoint_reading_flat(layered))
  assert layered_config.relative_attention_per_layer
  logits = _t5train_logits(layered_config,
                           convert.read_checkpoint_params(layered, layered_config), *batch)
  testing.assert_trees_close(logits[real], reference['logits'][real])

  # Written in the scanned layout when the gin's config scans; a layer count that disagrees fails.
  stacked = convert.import_t5x(_scanned_t5x_checkpoint(tmp_path / 't5x_again', False),
                               str(tmp_path / 'stacked'),
                               config=dataclasses.replace(config, scan_layers=True))
  saved = checkpoint_reading_flat(stacked)
  assert saved['encoder/layers/attention/query/kernel'].shape[0] == 2
  with pytest.raises(UserError, match=r'scanned encoder holds 2 layers but the gin file\'s '
                                      r'network.T5Config.num_encoder_layers is 3'):
    convert.import_t5x(str(tmp_path / 't5x_again'), str(tmp_path / 'bad'),
                       config=dataclasses.replace(config, num_encoder_layers=3))


def checkpoint_reading_flat(checkpoint):
  """Parameter path -> saved metadata (shape) of a t5train checkpoint."""
  from t5train import checkpoint_reading
  return dict(checkpoint_reading.flatten_with_names(
      checkpoint_reading.saved_tree(checkpoint_reading.item_dir(checkpoint))['params']))
