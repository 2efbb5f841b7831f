"""LoRA adapters: the base model at step 0, merged equals unmerged, PEFT's logits, training that
leaves the base frozen."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5train import hf_interop, network, optimizers, testing

LORA = network.LoraConfig(rank=4, alpha=8.0)
FAMILY = 'v1_1_gated_gelu_untied'  # tests/hf_models.py's T5 1.1 with random weights


def _config(lora=LORA):
  import hf_models  # noqa: PLC0415  (imports torch)
  return dataclasses.replace(hf_models.t5train_config(FAMILY), lora=lora)


def _batch(config):
  import hf_models  # noqa: PLC0415
  return hf_models.random_batch(config.vocab_size)


def _logits(config, params, batch):
  encoder, decoder_inputs, targets = (jnp.asarray(x) for x in batch)
  return np.asarray(network.Transformer(config).apply(
      {'params': params}, encoder, decoder_inputs, targets, enable_dropout=False))


@pytest.fixture(scope='module')
def adapted():
  """Adapted parameters with random (non-zero) adapters, and the config. The second matrices get
  a trained adapter's scale (std 0.05 against kernels of std 0.18): they move the logits well
  beyond rounding, and merging changes the order of float32 operations only."""
  config = _config()
  tokens = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(network.Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                                     enable_dropout=False)['params'])
  flat = traverse_util.flatten_dict(jax.device_get(params))
  rng = np.random.default_rng(0)
  flat = {path: (rng.normal(0, 0.05, x.shape).astype(np.float32) if path[-1] == 'lora_b' else x)
          for path, x in flat.items()}
  return config, traverse_util.unflatten_dict(flat)


def _flat(params):
  """{'encoder/layers_0/attention/query/kernel': array, ...}"""
  return {optimizers.param_path(p): np.asarray(x)
          for p, x in traverse_util.flatten_dict(params).items()}


def _base(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: x for p, x in flat.items() if not p[-1].startswith('lora')})


def test_adapters_sit_beside_the_targeted_kernels_only(adapted):
  config, params = adapted
  names = [optimizers.param_path(p) for p in traverse_util.flatten_dict(params)]
  adapters = [name for name in names if '/lora_' in name]
  # query and value of 2 encoder self-attentions, 3 decoder self- and 3 cross-attentions.
  assert len(adapters) == 2 * 2 * (2 + 3 + 3)
  assert all(name.split('/')[-2] in ('query', 'value') for name in adapters)
  assert params['encoder']['layers_0']['attention']['query']['lora_a'].shape == (
      config.emb_dim, LORA.rank)


def test_zero_adapters_give_the_base_model():
  config = _config()
  tokens = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(network.Transformer(config).init(jax.random.PRNGKey(1), tokens, tokens, tokens,
                                                     enable_dropout=False)['params'])
  batch = _batch(config)
  testing.assert_trees_equal(_logits(config, params, batch),
                             _logits(_config(lora=None), _base(params), batch))


def test_merged_weights_give_the_adapted_logits(adapted):
  config, params = adapted
  batch = _batch(config)
  unmerged = _logits(config, params, batch)
  merged = _logits(_config(lora=None), network.merge_lora(params, LORA), batch)
  base = _logits(_config(lora=None), _base(params), batch)
  assert np.abs(unmerged - base).max() > 1e-2 * np.abs(base).max()
  testing.assert_trees_close(merged, unmerged, rtol=1e-6)


def test_peft_lora_on_transformers_gives_the_same_logits(adapted):
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  import hf_models  # noqa: PLC0415
  config, params = adapted
  base_config = dataclasses.replace(config, lora=None)
  flat = _flat(_base(params))
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      **hf_interop.hf_config_from_t5_config(base_config))).eval()
  # A model built from a config shares lm_head's tensor with the embedding even when untied
  # (from_pretrained unties it); give it its own, as tests/hf_models.py does.
  hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
  state = {name: torch.from_numpy(np.array(value)) for name, value in
           hf_interop.hf_state_dict_from_flat_params(flat, base_config).items()}
  hf.load_state_dict(state, strict=False)  # the stacks' embed_tokens are the shared embedding
  model = peft.get_peft_model(hf, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha,
                                                  target_modules=['q', 'v'], lora_dropout=0.0))
  kernels = dict(hf_interop.name_pairs(base_config))
  with torch.no_grad():
    for name, adapter in _flat(params).items():
      if '/lora_' not in name:
        continue
      kernel = name.rsplit('/', 1)[0] + '/kernel'
      module = model.base_model.model.get_submodule(kernels[kernel].removesuffix('.weight'))
      which = module.lora_A if name.endswith('lora_a') else module.lora_B
      which['default'].weight.copy_(torch.from_numpy(np.asarray(adapter).T.copy()))
  batch = _batch(config)
  expected = hf_models.hf_logits(model, batch[0], batch[1])
  hf_models.assert_logits_close(_logits(config, params, batch), expected, batch[2])


def test_training_moves_the_adapters_only():
  config = testing.tiny_config(lora=LORA)
  multi = optimizers.MultiOptimizer([(r'.*/lora_[ab]', optimizers.AdamW())])
  batch = testing.random_batch()
  parts = testing.tiny_trainer(testing.tiny_model(config, multi), batch)
  before = _flat(jax.device_get(parts.trainer.train_state.params))
  for _ in range(3):
    parts.trainer.train_step(batch)
  after = _flat(jax.device_get(parts.trainer.train_state.params))
  for name in before:
    if '/lora_' in name:
      assert not np.array_equal(after[name], before[name]), name
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_export_to_transformers_writes_the_merged_weights(adapted, tmp_path):
  transformers = pytest.importorskip('transformers')
  import hf_models  # noqa: PLC0415

  from t5train import checkpoints, convert  # noqa: PLC0415
  config, params = adapted
  checkpoints.save_params(str(tmp_path / 'run'), params, 7)
  convert.export_hf(str(tmp_path / 'run' / 'checkpoint_7'), config, str(tmp_path / 'hf'))
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / 'hf')).eval()
  assert not any('lora' in name for name in reloaded.state_dict())
  batch = _batch(config)
  hf_models.assert_logits_close(_logits(config, params, batch),
                                hf_models.hf_logits(reloaded, batch[0], batch[1]), batch[2])


@pytest.mark.parametrize('targets, message', [
    (r'.*/no_such_layer/kernel', 'matches no parameter'),
    (r'.*/pre_mlp_layer_norm/scale', 'LoRA adapts 2-D kernels'),
])
def test_targets_that_name_no_kernel_are_user_errors(targets, message):
  from t5train.errors import UserError  # noqa: PLC0415
  config = testing.tiny_config(lora=network.LoraConfig(targets=targets))
  with pytest.raises(UserError, match=message):
    testing.tiny_trainer(testing.tiny_model(config))


def test_convert_to_merged_writes_a_plain_checkpoint_with_the_adapted_logits(adapted, tmp_path):
  from t5train import checkpoints, convert  # noqa: PLC0415
  from t5train.errors import UserError  # noqa: PLC0415
  config, params = adapted
  checkpoints.save_params(str(tmp_path / 'run'), params, 7)
  written = convert.export_merged(str(tmp_path / 'run' / 'checkpoint_7'), config,
                                  str(tmp_path / 'merged'))
  assert written.endswith('merged/checkpoint_7')
  assert 'lora' not in (tmp_path / 'merged' / 'model.gin').read_text()
  plain = _config(lora=None)
  merged = convert.read_checkpoint_params(written, plain)  # a UserError if adapters were left
  batch = _batch(config)
  testing.assert_trees_close(_logits(plain, hf_interop.nest(merged), batch),
                             _logits(config, params, batch), rtol=1e-6)
  with pytest.raises(UserError, match='bind no network.T5Config.lora'):
    convert.export_merged(written, plain, str(tmp_path / 'again'))


def test_convert_to_merged_takes_decoder_only_models_too(tmp_path):
  from t5train import checkpoints, convert  # noqa: PLC0415
  from t5train.decoder_only_network import DecoderOnlyTransformer  # noqa: PLC0415
  config = testing.tiny_config(num_encoder_layers=0, lora=LORA)
  tokens = jnp.asarray(np.random.default_rng(1).integers(2, 64, (2, 12)), jnp.int32)

  def logits(config, params):
    return np.asarray(DecoderOnlyTransformer(config).apply({'params': params}, tokens,
                                                           enable_dropout=False))

  params = nn.unbox(DecoderOnlyTransformer(config).init(jax.random.PRNGKey(0), tokens,
                                                        enable_dropout=False)['params'])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.05, x.shape).astype(np.float32)
      if path[-1].key == 'lora_b' else np.asarray(x), params)
  checkpoints.save_params(str(tmp_path / 'run'), params, 3)
  written = convert.export_merged(str(tmp_path / 'run' / 'checkpoint_3'), config,
                                  str(tmp_path / 'merged'))
  assert "include 'models/decoder_only/base_architecture.gin'" in (
      tmp_path / 'merged' / 'model.gin').read_text()
  plain = dataclasses.replace(config, lora=None)
  merged = hf_interop.nest(convert.read_checkpoint_params(written, plain))
  base = logits(plain, _base(params))
  assert np.abs(logits(config, params) - base).max() > 1e-2 * np.abs(base).max()
  testing.assert_trees_close(logits(plain, merged), logits(config, params), rtol=1e-6)
