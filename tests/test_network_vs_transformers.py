"""The network is T5 exactly: logits match transformers' PyTorch T5 given the same weights."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax.numpy as jnp  # noqa: E402

from t5train import hf_interop, network  # noqa: E402

# (name, transformers config kwargs, t5train mlp activations, tied output layer)
FAMILIES = [
    ('v1_1_gated_gelu_untied',
     dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj='gated-gelu'),
     ('gelu', 'linear'), False),
    ('v1_0_relu_tied',
     dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj='relu'),
     ('relu',), True),
    ('d_model_not_heads_times_kv_small_buckets',
     dict(d_model=48, d_kv=8, num_heads=3, d_ff=40, feed_forward_proj='gated-gelu',
          relative_attention_num_buckets=16, relative_attention_max_distance=20),
     ('gelu', 'linear'), False),
]
VOCAB, ENC_LEN, DEC_LEN, BATCH = 96, 40, 24, 3


def _hf_model(kwargs: dict, tied: bool) -> 'transformers.T5ForConditionalGeneration':
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=VOCAB, num_layers=2, num_decoder_layers=3, dropout_rate=0.0,
      layer_norm_epsilon=1e-6, tie_word_embeddings=tied, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1, **kwargs)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:  # T5 v1.1: shared input embedding, separate output layer (see facts.md)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, kwargs['d_model']) * 0.2)
  # Larger relative-position biases so that a wrong bucket shows in the logits.
  with torch.no_grad():
    for stack in (model.encoder, model.decoder):
      bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
      bias.copy_(torch.randn_like(bias))
  return model


def _t5train_config(kwargs: dict, activations: tuple, tied: bool) -> network.T5Config:
  return network.T5Config(
      vocab_size=VOCAB, dtype=jnp.float32, emb_dim=kwargs['d_model'],
      num_heads=kwargs['num_heads'], num_encoder_layers=2, num_decoder_layers=3,
      head_dim=kwargs['d_kv'], mlp_dim=kwargs['d_ff'], mlp_activations=activations,
      dropout_rate=0.0, logits_via_embedding=tied,
      relative_attention_num_buckets=kwargs.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=kwargs.get('relative_attention_max_distance', 128))


def _random_batch(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
  encoder = rng.integers(2, VOCAB, (BATCH, ENC_LEN))
  targets = rng.integers(2, VOCAB, (BATCH, DEC_LEN))
  for row, (enc_len, dec_len) in enumerate([(ENC_LEN, DEC_LEN), (25, 10), (7, 3)]):
    encoder[row, enc_len:] = 0  # trailing padding
    targets[row, dec_len:] = 0
  decoder_inputs = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  return encoder, decoder_inputs, targets


@pytest.mark.parametrize('name,kwargs,activations,tied', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_logits_match_transformers(name, kwargs, activations, tied):
  hf = _hf_model(kwargs, tied)
  encoder, decoder_inputs, targets = _random_batch(np.random.default_rng(0))
  with torch.no_grad():
    expected = hf(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0),
                  decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()

  config = _t5train_config(kwargs, activations, tied)
  state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params = hf_interop.params_from_hf_state_dict(state_dict, config)
  logits = network.Transformer(config).apply(
      {'params': params}, jnp.asarray(encoder), jnp.asarray(decoder_inputs),
      jnp.asarray(targets), enable_dropout=False)
  logits = np.asarray(logits)

  real = targets > 0
  error = np.max(np.abs(logits[real] - expected[real])) / np.max(np.abs(expected[real]))
  assert error < 1e-5, f'{name}: max relative error {error:.2e}'
