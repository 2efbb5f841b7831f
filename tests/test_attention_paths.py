"""The fused attention paths (jax.nn.dot_product_attention) keep T5's relative-position bias.

Unpacked batches hand the fused attention ``network.AttentionBias``: the bias [1, heads, q, k]
and the padding as lengths, never a [batch, heads, q, k] array. These tests compare that path
with t5train's own einsum attention on the dense bias: outputs at real positions, and the
gradients of the inputs, the projections and the learned bias table.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5train import network, testing

HEADS, HEAD_DIM, EMBED, BUCKETS = 2, 8, 16, 8


class _Attention(nn.Module):
  """One T5 attention with its relative-position table, the bias built as the stacks build it:
  ``fused`` as an AttentionBias, else as one dense array."""

  implementation: str | None
  fused: bool
  causal: bool = False
  relpos: bool = True
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x_q, x_kv, query_tokens, key_tokens):
    q_len, k_len = x_q.shape[1], x_kv.shape[1]
    buckets = network.position_buckets(q_len, k_len, not self.causal, BUCKETS, 16)
    relpos = (network.RelativePositionBiases(BUCKETS, HEADS, self.dtype)(buckets)
              if self.relpos else None)
    if self.fused:
      bias = network.AttentionBias.from_tokens(relpos, query_tokens, key_tokens, self.causal)
    else:
      mask = network.attention_mask(query_tokens, key_tokens, causal=self.causal)
      bias = network.mask_to_bias(mask, self.dtype)
      bias = bias if relpos is None else relpos + bias
    return network.MultiHeadAttention(HEADS, HEAD_DIM, self.dtype,
                                      implementation=self.implementation)(
                                          x_q, x_kv, bias, deterministic=True)


def _tokens(rng, batch, length):
  """Random ids with padding at the end of each row (one row unpadded)."""
  tokens = rng.integers(2, 50, (batch, length)).astype(np.int32)
  for row in range(1, batch):
    tokens[row, rng.integers(length // 2, length):] = 0
  return tokens


def _case(seed, q_len, k_len, self_attention):
  rng = np.random.default_rng(seed)
  x_q = rng.standard_normal((3, q_len, EMBED)).astype(np.float32)
  x_kv = x_q if self_attention else rng.standard_normal((3, k_len, EMBED)).astype(np.float32)
  q_tokens = _tokens(rng, 3, q_len)
  k_tokens = q_tokens if self_attention else _tokens(rng, 3, k_len)
  weights = rng.standard_normal((3, q_len, EMBED)).astype(np.float32)
  return x_q, x_kv, q_tokens, k_tokens, weights * (q_tokens > 0)[..., None]


def _outputs_and_grads(module, params, x_q, x_kv, q_tokens, k_tokens, weights):
  """Outputs and the gradients (parameters, query inputs) of a loss on the real positions.

  Padding queries attend to nothing in the fused path and to everything in the einsum path;
  nothing reads their outputs, so the loss leaves them out."""
  def loss(p, xq, xkv):
    out = module.apply({'params': p}, xq, xkv, q_tokens, k_tokens)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, x_q, x_kv)
  real = (q_tokens > 0)[..., None]
  return np.where(real, np.asarray(out, np.float32), 0.0), grads


@pytest.mark.parametrize('kind', ['encoder_self', 'decoder_self', 'cross'])
def test_fused_attention_with_lengths_equals_the_einsum_attention(kind):
  causal, self_attention = kind == 'decoder_self', kind != 'cross'
  q_len, k_len = (6, 6) if self_attention else (6, 10)
  case = _case(seed={'encoder_self': 0, 'decoder_self': 1, 'cross': 2}[kind], q_len=q_len,
               k_len=k_len, self_attention=self_attention)
  reference = _Attention(None, fused=False, causal=causal, relpos=kind != 'cross')
  params = nn.unbox(reference.init(jax.random.PRNGKey(0), *case[:4])['params'])
  if 'RelativePositionBiases_0' in params:  # a table far from zero, so that errors show
    table = params['RelativePositionBiases_0']['rel_embedding']
    params['RelativePositionBiases_0']['rel_embedding'] = 3.0 * jax.random.normal(
        jax.random.PRNGKey(5), table.shape)
  want_out, want_grads = _outputs_and_grads(reference, params, *case)
  fused = _Attention('xla', fused=True, causal=causal, relpos=kind != 'cross')
  got_out, got_grads = _outputs_and_grads(fused, params, *case)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
  testing.assert_trees_close(got_grads, want_grads)
  if kind != 'cross':  # the table's gradient is there, and not zero
    assert np.abs(got_grads[0]['RelativePositionBiases_0']['rel_embedding']).max() > 1e-3


def test_the_fused_call_gets_the_bias_without_a_batch_axis_and_the_padding_as_lengths(
    monkeypatch):
  seen = []
  fused = jax.nn.dot_product_attention

  def recording(query, key, value, bias=None, mask=None, **kwargs):
    seen.append((None if bias is None else bias.shape, mask, kwargs))
    return fused(query, key, value, bias, mask, **kwargs)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)
  x_q, x_kv, q_tokens, k_tokens, _ = _case(seed=3, q_len=6, k_len=6, self_attention=True)
  module = _Attention('xla', fused=True, causal=True)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x_q, x_kv, q_tokens, k_tokens)['params'])
  module.apply({'params': params}, x_q, x_kv, q_tokens, k_tokens)
  bias_shape, mask, kwargs = seen[-1]
  assert bias_shape == (1, HEADS, 6, 6) and mask is None and kwargs['is_causal']
  np.testing.assert_array_equal(kwargs['query_seq_lengths'], (q_tokens > 0).sum(1))
  np.testing.assert_array_equal(kwargs['key_value_seq_lengths'], (k_tokens > 0).sum(1))


def test_dense_is_t5s_mask_bias_plus_the_relative_position_bias():
  x_q, x_kv, q_tokens, k_tokens, _ = _case(seed=4, q_len=5, k_len=7, self_attention=False)
  relpos = jax.random.normal(jax.random.PRNGKey(1), (1, HEADS, 5, 7))
  for causal in (False, True):
    bias = network.AttentionBias.from_tokens(relpos, q_tokens, k_tokens, causal)
    want = relpos + network.mask_to_bias(
        network.attention_mask(q_tokens, k_tokens, causal=causal), jnp.float32)
    np.testing.assert_array_equal(bias.dense(jnp.float32, 5, 7), want)
  plus = network.AttentionBias.from_tokens(None, q_tokens, k_tokens).plus(relpos)
  np.testing.assert_array_equal(plus.relpos, relpos)


@pytest.mark.parametrize('options', [dict(relative_attention_per_layer=True, scan_layers=True),
                                     dict(remat_policy='full')])
def test_fused_model_equals_the_einsum_model_with_layer_options(options):
  """The whole tiny T5 (per-layer tables added to an AttentionBias, scanned, rematerialised):
  the same loss and gradients as the einsum attention."""
  batch = testing.random_batch(seed=11)
  einsum = testing.tiny_model(testing.tiny_config(**options))
  params = nn.unbox(einsum.get_initial_variables(jax.random.PRNGKey(2),
                                                 testing.input_shapes(batch))['params'])
  fused = testing.tiny_model(testing.tiny_config(attention_implementation='xla', **options))
  grad = lambda model: jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, None)
  (want_loss, _), want_grads = grad(einsum)
  (got_loss, _), got_grads = grad(fused)
  testing.assert_trees_close(float(got_loss), float(want_loss))
  testing.assert_trees_close(got_grads, want_grads)


def test_packed_batches_keep_the_dense_bias(monkeypatch):
  """Segment ids are not lengths: a packed batch hands the fused call the whole bias."""
  shapes = []
  fused = jax.nn.dot_product_attention

  def recording(query, key, value, bias=None, mask=None, **kwargs):
    shapes.append(None if bias is None else bias.shape)
    return fused(query, key, value, bias, mask, **kwargs)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)
  batch = testing.random_batch(batch_size=2, seed=12)
  for name in ('encoder', 'decoder'):
    tokens = batch[f'{name}_input_tokens' if name == 'encoder' else 'decoder_target_tokens']
    segments = np.where(tokens > 0, 1 + (np.arange(tokens.shape[1]) >= 3), 0).astype(np.int32)
    batch[f'{name}_segment_ids'] = segments
  model = testing.tiny_model(testing.tiny_config(attention_implementation='xla'))
  params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(2),
                                                testing.input_shapes(batch))['params'])
  einsum = testing.tiny_model(testing.tiny_config())
  shapes.clear()  # initialising saw an unpacked batch
  got, _ = model.loss_fn(params, batch, None)
  want, _ = einsum.loss_fn(params, batch, None)
  testing.assert_trees_close(float(got), float(want))
  assert len(shapes) == 6 and all(shape is not None and shape[0] == 2 for shape in shapes)


def test_cudnn_attention_with_the_bias_equals_float32_einsum_attention():
  """On an NVIDIA GPU: cuDNN's fused attention in bfloat16 with T5's bias and padding lengths,
  against the float32 einsum attention (outputs and gradients, the bias table's too)."""
  if jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention needs an NVIDIA GPU')
  for kind in ('encoder_self', 'decoder_self'):
    causal = kind == 'decoder_self'
    case = _case(seed=7, q_len=64, k_len=64, self_attention=True)
    reference = _Attention(None, fused=False, causal=causal)
    params = nn.unbox(reference.init(jax.random.PRNGKey(0), *case[:4])['params'])
    want_out, want_grads = _outputs_and_grads(reference, params, *case)
    cudnn = _Attention('cudnn', fused=True, causal=causal, dtype='bfloat16')
    got_out, got_grads = _outputs_and_grads(cudnn, params, *case)
    relative_error = lambda got, want: (np.linalg.norm(np.asarray(got, np.float32) - want) /
                                        np.linalg.norm(want))
    assert relative_error(got_out, want_out) < 2e-2
    for got, want in zip(jax.tree_util.tree_leaves(got_grads),
                         jax.tree_util.tree_leaves(want_grads)):
      assert relative_error(got, np.asarray(want)) < 3e-2
