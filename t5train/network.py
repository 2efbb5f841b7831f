"""The T5 encoder-decoder (v1.0 and v1.1 layouts) as Flax modules.

Pure model code: no I/O, no optimiser, no sharding decisions. Every parameter
and the main activations carry logical axis names (batch, length, embed, heads,
kv, joined_kv, mlp, vocab, relpos_buckets); the partitioner maps them to mesh
axes. Parameter paths follow T5X's (``encoder/layers_0/attention/query/kernel``)
so checkpoints and converters line up.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Added to attention logits where attention is not allowed. Large but finite so
# that fully masked rows (padding queries) still give a valid softmax.
_MASKED_LOGIT = -1e10


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (LoRA, Hu et al. 2021) beside the kernels whose names match ``targets``.

  A matched kernel W [in, out] gets ``lora_a`` [in, rank] (random) and ``lora_b`` [rank, out]
  (zeros, so training starts from the base model) next to it, and its projection becomes
  ``x W + (alpha / rank) (x lora_a) lora_b``, as PEFT's ``LoraConfig(r, lora_alpha)``.
  ``targets`` is a regex over whole parameter names (``optimizers.param_path``), e.g. the
  default's query and value kernels of every attention.
  """

  rank: int = 8
  alpha: float = 8.0
  targets: str = r'.*/(query|value)/kernel'

  def __post_init__(self) -> None:
    if self.rank < 1:
      raise ValueError(f'LoraConfig.rank must be >= 1, not {self.rank}')
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f'LoraConfig.targets {self.targets!r} is not a regular expression: '
                       f'{e}') from e

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def applies_to(self, name: str) -> bool:
    return re.fullmatch(self.targets, name) is not None

  def check_targets(self, names: Sequence[str]) -> None:
    """A ValueError unless ``targets`` names at least one kernel and nothing else of the
    parameter names ``names`` (those of the model with its adapters)."""
    matched = [name for name in names if '/lora_' not in name and self.applies_to(name)]
    if not matched:
      raise ValueError(f'LoraConfig.targets {self.targets!r} matches no parameter; kernels are '
                       "named like 'encoder/layers_0/attention/query/kernel' (see "
                       'model-info.txt)')
    others = [name for name in matched if not name.endswith('/kernel')]
    if others:
      raise ValueError(f'LoraConfig.targets {self.targets!r} matches {others[0]!r}: LoRA '
                       'adapts 2-D kernels (names ending in /kernel) only')


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder-decoder, with T5X's field names."""

  vocab_size: int
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('relu',)
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # umT5: every layer's self-attention has its own relative-position table
  # (``<stack>/layers_<i>/relpos_bias``) instead of one per stack (``<stack>/relpos_bias``).
  relative_attention_per_layer: bool = False
  layer_norm_epsilon: float = 1e-6
  # One ``nn.scan`` over each stack's layers: compile time stops growing with depth, and each
  # layer parameter is stored once for the stack, stacked on a leading ``layers`` axis
  # (``encoder/layers/...``; see ``stack_layers``).
  scan_layers: bool = False
  # What the backward pass keeps of each layer's forward activations (see REMAT_POLICIES).
  remat_policy: str = 'none'
  # None: t5train's own attention (einsums, softmax in float32). 'xla' or 'cudnn':
  # jax.nn.dot_product_attention with that implementation (cuDNN's fused attention on NVIDIA
  # GPUs, bfloat16 or float16) for every call without attention dropout or a decoding cache.
  # Unpacked batches (rows padded at the end, as T5's feature converters give) hand it the
  # relative-position bias [1, heads, q, k] and the padding as lengths (see AttentionBias), so
  # no [batch, heads, q, k] array is built; packed batches (segment ids) hand it the whole bias.
  attention_implementation: str | None = None
  # Low-rank adapters beside chosen kernels (fine-tuning within memory); see LoraConfig.
  lora: LoraConfig | None = None
  # Prompt tuning (Lester et al. 2021): this many learned embeddings (``encoder/prompt/prompt``)
  # go before every encoder input; the encoder's length grows by as many positions.
  num_prompts: int = 0

  def __post_init__(self) -> None:
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; choose one of '
                       f'{sorted(REMAT_POLICIES)}')
    if self.attention_implementation not in (None, 'xla', 'cudnn'):
      raise ValueError(f'unknown attention_implementation {self.attention_implementation!r}; '
                       "choose None, 'xla' or 'cudnn'")
    if self.attention_implementation == 'cudnn' and jax.default_backend() != 'gpu':
      raise ValueError("attention_implementation='cudnn' needs an NVIDIA GPU, and JAX's devices "
                       f"here are {jax.default_backend()}; use None or 'xla'")

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


# Rematerialisation: 'none' keeps every activation the backward pass needs; 'full' keeps only
# each layer's input and recomputes the rest (least memory, about one more forward pass);
# 'dots_saveable' keeps the matmul outputs and recomputes the cheap elementwise work between them.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _fan_in_normal(scale: float = 1.0) -> Initializer:
  return nn.initializers.variance_scaling(scale, 'fan_in', 'normal')


def _fan_in_truncated_normal() -> Initializer:
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def _activation(name: str) -> Callable[[Array], Array]:
  if name == 'linear':
    return lambda x: x
  if name == 'gelu':
    # The tanh approximation, as T5 v1.1 ('gelu_new' in transformers).
    return lambda x: nn.gelu(x, approximate=True)
  if name in ('relu', 'silu', 'swish', 'tanh', 'sigmoid'):
    return getattr(nn, name)
  raise ValueError(f'unknown mlp activation {name!r}')


class LayerNorm(nn.Module):
  """T5's RMS norm: scale only, no bias or mean subtraction, computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(mean_square + self.epsilon)
    return (y * scale).astype(self.dtype)


@jax.custom_vjp
def _matmul(x: Array, kernel: Array) -> Array:
  """``x @ kernel``, whose kernel gradient contracts a materialised transpose of ``x``.

  Left to itself, XLA:CPU computes the kernel gradient by writing the output
  gradient out transposed, fused into the elementwise backward of the layer
  above; that strided write cost 0.3 s of a 1.65 s T5-small step on 2 cores.
  Transposing the (narrower) input instead is cheap. The values are the same;
  other backends keep their own choice (GPU matmuls take transposes for free).
  """
  return jnp.dot(x, kernel)


def _matmul_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
  return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  rows, g_rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  grad_kernel = jax.lax.platform_dependent(
      rows, g_rows, cpu=lambda r, g: jnp.dot(jax.lax.optimization_barrier(r.T), g),
      default=lambda r, g: jnp.dot(r.T, g))
  return jnp.dot(g, kernel.T), grad_kernel


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
  """A bias-free projection whose 2-D float32 kernel is cast to ``dtype`` for the matmul; with
  ``lora`` naming its kernel, plus a low-rank adapter (see ``LoraConfig``)."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = _fan_in_truncated_normal()
  dtype: Any = jnp.float32
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    x = x.astype(self.dtype)
    y = _matmul(x, kernel.astype(self.dtype))
    if self.lora is None or not self.lora.applies_to('/'.join(self.scope.path) + '/kernel'):
      return y
    rank = self.lora.rank
    lora_a = self.param('lora_a', nn.with_logical_partitioning(_fan_in_normal(),
                                                               (self.kernel_axes[0], None)),
                        (x.shape[-1], rank), jnp.float32)
    lora_b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (None, self.kernel_axes[1])),
                        (rank, self.features), jnp.float32)
    low_rank = jnp.dot(jnp.dot(x, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
    return y + (self.lora.scale * low_rank).astype(y.dtype)


class Embed(nn.Module):
  """Token embedding table, also usable as the tied output projection."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """Logits against the embedding table: [..., embed] -> [..., vocab]."""
    return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucketing of (key position - query position).

  Half the buckets hold exact small distances, the rest grow logarithmically up
  to ``max_distance``; a bidirectional table spends half its buckets on each side.
  """
  bucket = np.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(relative_position.dtype) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide='ignore'):
    log_ratio = np.log(np.maximum(n, 1).astype(np.float32) / max_exact) / np.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(is_small, n, large)


def position_buckets(query_length: int, key_length: int, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> np.ndarray:
  """Bucket ids [query_length, key_length] of every (query, key) pair, queries from position 0."""
  context = np.arange(query_length, dtype=np.int32)[:, None]
  memory = np.arange(key_length, dtype=np.int32)[None, :]
  return relative_position_bucket(memory - context, bidirectional, num_buckets, max_distance)


class RelativePositionBiases(nn.Module):
  """One learned scalar per (bucket, head): one table per stack (T5), or per layer (umT5)."""

  num_buckets: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, buckets: Array) -> Array:
    """Bias [1, heads, queries, keys] for bucket ids [queries, keys] (see ``position_buckets``),
    or [batch, heads, queries, keys] for per-row ids [batch, queries, keys]."""
    table = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                                     ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), jnp.float32)
    buckets = jnp.asarray(buckets)
    bias = jnp.take(table, buckets, axis=1)  # [heads, (batch,) q, k]
    bias = bias[None] if buckets.ndim == 2 else jnp.moveaxis(bias, 0, 1)
    return bias.astype(self.dtype)


def relative_position_table(config: T5Config) -> RelativePositionBiases:
  """The (stack's or layer's) relative-position table module, named as T5X names it."""
  return RelativePositionBiases(config.relative_attention_num_buckets, config.num_heads,
                                dtype=config.activation_dtype, name='relpos_bias')


@flax.struct.dataclass
class AttentionBias:
  """T5's additive attention bias in the parts ``jax.nn.dot_product_attention`` takes apart.

  ``relpos`` is the relative-position bias [1, heads, queries, keys] (or None: no bias, as in
  cross-attention), the same for every row; padding is given as ``query_lengths`` and
  ``key_lengths`` [batch] (int32: a row's positions from its length on are padding); ``causal``
  hides later keys. The fused attention reads these as they are, so no [batch, heads, queries,
  keys] bias is built, nor, with cuDNN, its gradient: the gradient reaching ``relpos`` (the
  learned table) is one [heads, queries, keys] array. ``dense`` is the same bias as one array,
  the one ``mask_to_bias`` of T5's padding mask plus ``relpos`` gives for rows padded at the end.
  """

  relpos: Array | None
  query_lengths: Array
  key_lengths: Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def from_tokens(cls, relpos: Array | None, query_tokens: Array, key_tokens: Array,
                  causal: bool = False) -> AttentionBias:
    """Lengths read off token ids (0 is padding), for rows padded at the end only (what T5's
    unpacked feature converters give)."""
    return cls(relpos, _lengths(query_tokens), _lengths(key_tokens), causal)

  def plus(self, relpos: Array) -> AttentionBias:
    """This bias with ``relpos`` [1, heads, queries, keys] added (umT5's per-layer tables)."""
    return self.replace(relpos=relpos if self.relpos is None else self.relpos + relpos)

  def dense(self, dtype: Any, query_length: int, key_length: int) -> Array:
    """The bias as one array [batch, heads or 1, queries, keys]."""
    query_real = jnp.arange(query_length)[None, :] < self.query_lengths[:, None]
    key_real = jnp.arange(key_length)[None, :] < self.key_lengths[:, None]
    mask = query_real[:, None, :, None] & key_real[:, None, None, :]
    if self.causal:
      mask &= jnp.tril(jnp.ones((query_length, key_length), bool))[None, None]
    bias = mask_to_bias(mask, dtype)
    return bias if self.relpos is None else self.relpos + bias


def _lengths(tokens: Array) -> Array:
  return jnp.sum(tokens > 0, axis=-1, dtype=jnp.int32)


@flax.struct.dataclass
class PromptCacheBias:
  """The additive bias of one decoding step of a decoder-only model, in the two parts of its
  cache: ``prompt`` [examples, heads or 1, 1, prompt_length] over the prompt's keys, which
  the example's decodes share, and ``generated`` [1, heads or 1, 1, generated_length] over
  each decode's own keys (see ``MultiHeadAttention``). Relative-position bucket ids come in
  the same two parts."""

  prompt: Array
  generated: Array

  def plus(self, relpos: PromptCacheBias) -> PromptCacheBias:
    """This bias with a relative-position bias of the same two parts added."""
    return PromptCacheBias(self.prompt + relpos.prompt, self.generated + relpos.generated)


def add_bias(bias: Array | AttentionBias | PromptCacheBias, relpos: Any
             ) -> Array | AttentionBias | PromptCacheBias:
  """``bias`` (an array, an AttentionBias or a PromptCacheBias) plus a relative-position bias."""
  if isinstance(bias, (AttentionBias, PromptCacheBias)):
    return bias.plus(relpos)
  return bias + relpos


def _heads_major(x: Array) -> Array:
  """[batch, length, heads, kv] -> [batch, heads, length, kv], the layout the attention
  matmuls read, so that cached keys and values are not transposed again at every step."""
  return jnp.swapaxes(x, 1, 2)


class MultiHeadAttention(nn.Module):
  """T5 attention: no 1/sqrt(head_dim) on the logits (it is folded into the query init).

  For cached decoding, ``cache`` is ``'self'`` (keys and values of past positions
  are kept in the ``cache`` collection and this call adds position
  ``cache_index``), ``'cross'`` (the projected encoder outputs are computed
  once and reused) or ``'prompt'`` (a decoder-only model's self-attention: the
  prompt's keys and values, one row per example, and ``generated_length`` more
  positions per decode for what the decodes generate, written at ``cache_index``,
  the step; the bias is a ``PromptCacheBias``). Cached keys and values are stored
  heads-major ``[batch, heads, length, kv]``. The first call with a cache creates
  it: zeros for ``'self'``, sized by that call's length, which is the maximum
  decode length; the projected prompt (that call's keys and values) for
  ``'prompt'``. Cross and prompt caches keep one row per example; a decoding step
  may bring several consecutive query rows per example (beams or samples), each
  with one query position, and those rows share the example's one copy, so beam
  search neither repeats nor reorders it.
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  implementation: str | None = None  # T5Config.attention_implementation
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Any, deterministic: bool,
               cache: str | None = None, cache_index: Array | None = None,
               generated_length: int | None = None) -> Array:
    inner = self.num_heads * self.head_dim
    query_init = _fan_in_normal(1.0 / self.head_dim)  # variance 1/(fan_in * head_dim)
    projection = lambda name, init: Dense(inner, ('embed', 'joined_kv'), init, self.dtype,
                                          self.lora, name=name)
    split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))
    constrain = lambda x: nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))
    q = constrain(split(projection('query', query_init)(inputs_q)))  # [batch, length, heads, kv]
    key_value = lambda: (constrain(split(projection('key', _fan_in_normal())(inputs_kv))),
                         constrain(split(projection('value', _fan_in_normal())(inputs_kv))))
    dropout = not deterministic and self.dropout_rate > 0.0
    if cache == 'prompt' and self.has_variable('cache', 'prompt_key'):
      out = self._prompt_cache_step(q, *key_value(), bias, cache_index)
    elif self.implementation is not None and cache is None and not dropout:
      # No 1/sqrt(head_dim) scale, as everywhere in T5; the softmax runs in float32.
      k, v = key_value()
      if isinstance(bias, AttentionBias):
        relpos = None if bias.relpos is None else bias.relpos.astype(q.dtype)
        out = jax.nn.dot_product_attention(
            q, k, v.astype(self.dtype), bias=relpos, scale=1.0, is_causal=bias.causal,
            query_seq_lengths=bias.query_lengths, key_value_seq_lengths=bias.key_lengths,
            implementation=self.implementation)
      else:
        out = jax.nn.dot_product_attention(q, k, v.astype(self.dtype), bias=bias.astype(q.dtype),
                                           scale=1.0, implementation=self.implementation)
    else:
      if isinstance(bias, AttentionBias):  # attention dropout: the einsums below
        bias = bias.dense(self.dtype, inputs_q.shape[1], inputs_kv.shape[1])
      if cache == 'cross':
        k, v = self._cross_cache(key_value)
      elif cache == 'self':
        k, v = self._self_cache(*key_value(), cache_index)
      elif cache == 'prompt':
        k, v = self._create_prompt_cache(*key_value(), generated_length)
      else:
        k, v = (_heads_major(x) for x in key_value())
      # Several decodes of an example (beams, samples: consecutive rows) share its one copy of
      # the cross-attention keys and values: their query rows become query positions.
      rows, decodes = q.shape[0], q.shape[0] // k.shape[0]
      q = q.reshape((k.shape[0], decodes * q.shape[1]) + q.shape[2:])
      if self.float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
      logits = jnp.einsum('bqhd,bhkd->bhqk', q, k) + bias.astype(q.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
      if dropout:
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      out = jnp.einsum('bhqk,bhkd->bqhd', weights, v.astype(self.dtype))
      out = out.reshape((rows, out.shape[1] // decodes) + out.shape[2:])
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
    out = out.reshape(out.shape[:2] + (inner,))
    return Dense(inputs_q.shape[-1], ('joined_kv', 'embed'), _fan_in_normal(), self.dtype,
                 self.lora, name='out')(out)

  def _cross_cache(self, key_value: Callable[[], tuple[Array, Array]]) -> tuple[Array, Array]:
    if self.has_variable('cache', 'cross_key'):
      return self.get_variable('cache', 'cross_key'), self.get_variable('cache', 'cross_value')
    k, v = (_heads_major(x) for x in key_value())
    self.put_variable('cache', 'cross_key', k)
    self.put_variable('cache', 'cross_value', v)
    return k, v

  def _self_cache(self, k: Array, v: Array, cache_index: Array | None) -> tuple[Array, Array]:
    """Keys and values of every cached position, with this call's written at ``cache_index``
    (one position for every row).

    The creating call stores its own keys and values, sized by its length; later
    positions are overwritten as decoding reaches them, and masks hide them until then.
    """
    k, v = _heads_major(k).astype(self.dtype), _heads_major(v).astype(self.dtype)
    if not self.has_variable('cache', 'cached_key'):  # creating the cache: max length = k's
      self.put_variable('cache', 'cached_key', k)
      self.put_variable('cache', 'cached_value', v)
      return k, v
    start = (0, 0, cache_index, 0)
    k = jax.lax.dynamic_update_slice(self.get_variable('cache', 'cached_key'), k, start)
    v = jax.lax.dynamic_update_slice(self.get_variable('cache', 'cached_value'), v, start)
    self.put_variable('cache', 'cached_key', k)
    self.put_variable('cache', 'cached_value', v)
    return k, v

  def _create_prompt_cache(self, k: Array, v: Array, generated_length: int | None
                           ) -> tuple[Array, Array]:
    """Stores the prompt's keys and values and zeros for ``generated_length`` positions."""
    if generated_length is None:
      raise ValueError('creating a prompt cache needs generated_length')
    k, v = _heads_major(k).astype(self.dtype), _heads_major(v).astype(self.dtype)
    self.put_variable('cache', 'prompt_key', k)
    self.put_variable('cache', 'prompt_value', v)
    generated_shape = k.shape[:2] + (generated_length, k.shape[3])
    self.put_variable('cache', 'cached_key', jnp.zeros(generated_shape, self.dtype))
    self.put_variable('cache', 'cached_value', jnp.zeros(generated_shape, self.dtype))
    return k, v

  def _prompt_cache_step(self, q: Array, k: Array, v: Array, bias: PromptCacheBias,
                         step: Array) -> Array:
    """Attention of one query per decode [rows, 1, heads, kv] over its example's prompt and
    its own generated positions, with this step's keys and values written at ``step``.

    One softmax runs over both parts; the prompt's logits come from one matmul per
    example whose queries are the example's decodes.
    """
    start = (0, 0, step, 0)
    generated_k = jax.lax.dynamic_update_slice(self.get_variable('cache', 'cached_key'),
                                               _heads_major(k).astype(self.dtype), start)
    generated_v = jax.lax.dynamic_update_slice(self.get_variable('cache', 'cached_value'),
                                               _heads_major(v).astype(self.dtype), start)
    self.put_variable('cache', 'cached_key', generated_k)
    self.put_variable('cache', 'cached_value', generated_v)
    prompt_k = self.get_variable('cache', 'prompt_key')
    prompt_v = self.get_variable('cache', 'prompt_value')
    rows, examples = q.shape[0], prompt_k.shape[0]
    decodes, prompt_length = rows // examples, prompt_k.shape[2]
    if self.float32_logits:
      q, prompt_k, generated_k = (x.astype(jnp.float32) for x in (q, prompt_k, generated_k))
    per_example = q.reshape((examples, decodes) + q.shape[2:])  # decodes as query positions
    prompt_logits = (jnp.einsum('bqhd,bhkd->bhqk', per_example, prompt_k)
                     + bias.prompt.astype(q.dtype))  # [examples, heads, decodes, prompt]
    generated_logits = (jnp.einsum('bqhd,bhkd->bhqk', q, generated_k)
                        + bias.generated.astype(q.dtype))  # [rows, heads, 1, generated]
    generated_logits = jnp.swapaxes(
        generated_logits.reshape((examples, decodes) + generated_logits.shape[1:2] + (-1,)), 1, 2)
    weights = jax.nn.softmax(jnp.concatenate([prompt_logits, generated_logits], axis=-1
                                             ).astype(jnp.float32)).astype(self.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', weights[..., :prompt_length], prompt_v.astype(self.dtype))
    generated_weights = jnp.swapaxes(weights[..., prompt_length:], 1, 2)  # [examples, decodes, ...]
    generated_weights = generated_weights.reshape((rows,) + generated_weights.shape[2:3] + (1, -1))
    out = out.reshape((rows, 1) + out.shape[2:]) + jnp.einsum(
        'bhqk,bhkd->bqhd', generated_weights, generated_v.astype(self.dtype))
    return out


class MlpBlock(nn.Module):
  """Feed-forward block; several activations multiply (gated-GELU is ('gelu', 'linear'))."""

  mlp_dim: int
  activations: Sequence[str]
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    hidden = None
    for i, name in enumerate(self.activations):
      dense_name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      h = _activation(name)(Dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype,
                                  lora=self.lora, name=dense_name)(x))
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
    return Dense(x.shape[-1], ('mlp', 'embed'), dtype=self.dtype, lora=self.lora,
                 name='wo')(hidden)


def mask_to_bias(mask: Array, dtype: Any) -> Array:
  """Additive attention bias: 0 where ``mask`` allows, a large negative number elsewhere."""
  return jnp.where(mask, 0.0, _MASKED_LOGIT).astype(dtype)


def attention_mask(query_tokens: Array, key_tokens: Array, query_segment_ids: Array | None = None,
                   key_segment_ids: Array | None = None, causal: bool = False,
                   bidirectional_region: Array | None = None) -> Array:
  """Boolean mask [batch, 1, q, k]: real tokens, same packed segment and, if causal, the past.

  ``bidirectional_region`` [batch, length] (self-attention only; a prefix LM's
  ``decoder_causal_attention``) marks positions that also see the later positions
  of the region, as T5X's ``make_decoder_mask``.
  """
  mask = (query_tokens > 0)[:, None, :, None] & (key_tokens > 0)[:, None, None, :]
  if query_segment_ids is not None and key_segment_ids is not None:
    mask &= query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]
  if causal:
    q_len, k_len = query_tokens.shape[1], key_tokens.shape[1]
    visible = jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
    if bidirectional_region is not None:
      region = bidirectional_region > 0
      visible = visible | (region[:, None, :, None] & region[:, None, None, :])
    mask &= visible
  return mask


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool,
               relpos_buckets: Array | None = None) -> Array:
    """``relpos_buckets``: with ``relative_attention_per_layer``, the bucket ids this layer's own
    table turns into the bias added to ``bias`` (which then holds only the mask)."""
    cfg = self.config
    if relpos_buckets is not None:
      bias = add_bias(bias, relative_position_table(cfg)(relpos_buckets))
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=name)
    h = norm('pre_attention_layer_norm')(x)
    h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.activation_dtype, cfg.dropout_rate,
                           cfg.float32_attention_logits, cfg.attention_implementation, cfg.lora,
                           name='attention')(h, h, bias, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    h = norm('pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.activation_dtype, cfg.dropout_rate,
                 cfg.lora, name='mlp')(h, deterministic)
    x = x + dropout(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    return (x, None) if cfg.scan_layers else x


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, y: Array, encoded: Array | None, self_bias: Array, cross_bias: Array | None,
               deterministic: bool, decode: bool = False, cache_index: Array | None = None,
               relpos_buckets: Any = None, generated_length: int | None = None) -> Array:
    """Without ``encoded`` (a decoder-only model) decoding keeps the prompt apart from the
    ``generated_length`` positions each decode generates (the ``'prompt'`` cache)."""
    cfg = self.config
    if relpos_buckets is not None:  # umT5: this layer's own table (see EncoderLayer)
      table = relative_position_table(cfg)
      self_bias = add_bias(self_bias, jax.tree_util.tree_map(table, relpos_buckets))
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=name)
    attention = lambda name: MultiHeadAttention(cfg.num_heads, cfg.head_dim, cfg.activation_dtype,
                                                cfg.dropout_rate, cfg.float32_attention_logits,
                                                cfg.attention_implementation, cfg.lora, name=name)
    h = norm('pre_self_attention_layer_norm')(y)
    self_cache = None if not decode else 'self' if encoded is not None else 'prompt'
    h = attention('self_attention')(h, h, self_bias, deterministic, self_cache, cache_index,
                                    generated_length)
    y = y + dropout(h, deterministic=deterministic)
    if encoded is not None:  # a decoder-only model has no encoder to attend to
      h = norm('pre_cross_attention_layer_norm')(y)
      h = attention('encoder_decoder_attention')(h, encoded, cross_bias, deterministic,
                                                 'cross' if decode else None)
      y = y + dropout(h, deterministic=deterministic)
    h = norm('pre_mlp_layer_norm')(y)
    h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.activation_dtype, cfg.dropout_rate,
                 cfg.lora, name='mlp')(h, deterministic)
    y = y + dropout(h, deterministic=deterministic)
    y = nn.with_logical_constraint(y, ('batch', 'length', 'embed'))
    return (y, None) if cfg.scan_layers else y


def run_layers(layer: type[nn.Module], config: T5Config, num_layers: int,
               static_argnums: tuple[int, ...], x: Array, *args: Any) -> Array:
  """Runs a stack's ``num_layers`` layers on ``x``; called inside the stack's compact method.

  ``static_argnums`` are the layer's Python-valued arguments (``self`` is 0). With
  remat each layer recomputes its activations as the policy says; with
  ``scan_layers`` one scanned layer named ``layers`` holds every layer's
  parameters stacked on axis 0, and its decoding cache on axis 1 (after batch).
  """
  if config.remat_policy != 'none':
    layer = nn.remat(layer, policy=REMAT_POLICIES[config.remat_policy],
                     prevent_cse=not config.scan_layers, static_argnums=static_argnums)
  if not config.scan_layers:
    for i in range(num_layers):
      x = layer(config, name=f'layers_{i}')(x, *args)
    return x
  scanned = nn.scan(layer, variable_axes={'params': 0, 'cache': 1},
                    split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                    length=num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
  return scanned(config, name='layers')(x, *args)[0]


class Prompts(nn.Module):
  """``num_prompts`` learned input embeddings, the same for every example (prompt tuning),
  initialised uniformly in [-0.5, 0.5] as in Lester et al. 2021."""

  num_prompts: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch_size: int) -> Array:
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -0.5, 0.5)
    prompts = self.param('prompt', nn.with_logical_partitioning(init, (None, 'embed')),
                         (self.num_prompts, self.features), jnp.float32)
    return jnp.broadcast_to(prompts.astype(self.dtype)[None], (batch_size,) + prompts.shape)


def with_prompt_positions(tokens: Array, num_prompts: int) -> Array:
  """Token ids (or a 0/1 prefix region) with ``num_prompts`` non-padding placeholders (1) in
  front: what the masks of a stack with prompts read padding (and the prefix) from."""
  if not num_prompts:
    return tokens
  return jnp.concatenate([jnp.ones((tokens.shape[0], num_prompts), tokens.dtype), tokens], axis=1)


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    embedded = self.shared_embedding(tokens)
    if cfg.num_prompts:
      if segment_ids is not None:
        raise ValueError('prompt tuning prepends the prompts to each input; pack=False is needed')
      prompts = Prompts(cfg.num_prompts, cfg.emb_dim, cfg.activation_dtype,
                        name='prompt')(tokens.shape[0])
      embedded = jnp.concatenate([prompts, embedded], axis=1)
      tokens = with_prompt_positions(tokens, cfg.num_prompts)
    length = tokens.shape[1]
    buckets = position_buckets(length, length, True, cfg.relative_attention_num_buckets,
                               cfg.relative_attention_max_distance)
    layer_buckets = buckets if cfg.relative_attention_per_layer else None
    relpos = None if layer_buckets is not None else relative_position_table(cfg)(buckets)
    if cfg.attention_implementation is not None and segment_ids is None:
      bias = AttentionBias.from_tokens(relpos, tokens, tokens)
    else:
      bias = mask_to_bias(attention_mask(tokens, tokens, segment_ids, segment_ids),
                          cfg.activation_dtype)
      bias = bias if relpos is None else relpos + bias
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    x = dropout(embedded, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    x = run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, (3,), x, bias, deterministic,
                    layer_buckets)
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='encoder_norm')(x)
    return dropout(x, deterministic=deterministic)


def output_logits(config: T5Config, embedding: Embed, y: Array) -> Array:
  """Float32 logits [batch, length, vocab] of the final hidden states; called inside a
  decoder stack's compact method, which owns ``logits_dense`` when logits are untied."""
  if config.logits_via_embedding:
    # Tied output layer (T5 v1.0): rescale so logits keep unit-variance scale.
    logits = embedding.attend(y) / jnp.sqrt(y.shape[-1]).astype(y.dtype)
  else:
    logits = Dense(config.vocab_size, ('embed', 'vocab'), dtype=jnp.float32, lora=config.lora,
                   name='logits_dense')(y)
  logits = logits.astype(jnp.float32)
  return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


class Decoder(nn.Module):
  """The decoder stack. With ``decode=True`` it runs one position at a time from a cache.

  The first ``decode=True`` call, with inputs of the full decode length, creates
  the cache (its outputs are not meaningful); each later call takes one token
  per row [batch, 1] and returns that position's logits. Decoding steps are never
  dropped out.
  """

  config: T5Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded: Array, encoder_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None, encoder_segment_ids: Array | None,
               decoder_segment_ids: Array | None, deterministic: bool,
               decode: bool = False, max_decode_length: int | None = None) -> Array:
    cfg = self.config
    buckets = lambda length: position_buckets(length, length, False,
                                              cfg.relative_attention_num_buckets,
                                              cfg.relative_attention_max_distance)
    cache_index = None
    if decode and self.has_variable('cache', 'cache_index'):
      if max_decode_length is None:
        raise ValueError('a decoding step needs max_decode_length, the length of the cache')
      self_bias, cross_bias, cache_index = self._decode_step_masks(encoder_tokens,
                                                                   max_decode_length)
      # The cached position's row of the bucket ids.
      self_buckets = jax.lax.dynamic_slice_in_dim(jnp.asarray(buckets(max_decode_length)),
                                                  cache_index, 1, axis=0)
    else:
      if decode:  # creating the cache: this call's length is the maximum decode length
        self.put_variable('cache', 'cache_index', jnp.zeros((), jnp.int32))
        decoder_target_tokens = jnp.ones_like(decoder_input_tokens)
      length = decoder_input_tokens.shape[1]
      self_buckets = buckets(length)
      # Padding is read off the targets: the first decoder input is BOS (id 0).
      if (cfg.attention_implementation is not None and not decode
          and decoder_segment_ids is None and encoder_segment_ids is None):
        self_bias = AttentionBias.from_tokens(None, decoder_target_tokens, decoder_target_tokens,
                                              causal=True)
        cross_bias = AttentionBias.from_tokens(None, decoder_target_tokens, encoder_tokens)
      else:
        self_mask = attention_mask(decoder_target_tokens, decoder_target_tokens,
                                   decoder_segment_ids, decoder_segment_ids, causal=True)
        cross_mask = attention_mask(decoder_target_tokens, encoder_tokens,
                                    decoder_segment_ids, encoder_segment_ids)
        self_bias = mask_to_bias(self_mask, cfg.activation_dtype)
        cross_bias = mask_to_bias(cross_mask, cfg.activation_dtype)
    layer_buckets = self_buckets if cfg.relative_attention_per_layer else None
    if layer_buckets is None:
      self_bias = add_bias(self_bias, relative_position_table(cfg)(self_buckets))
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = dropout(self.shared_embedding(decoder_input_tokens), deterministic=deterministic)
    y = nn.with_logical_constraint(y, ('batch', 'length', 'embed'))
    y = run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, (5, 6), y, encoded, self_bias,
                    cross_bias, deterministic, decode, cache_index, layer_buckets)
    y = LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='decoder_norm')(y)
    y = dropout(y, deterministic=deterministic)
    return output_logits(cfg, self.shared_embedding, y)

  def _decode_step_masks(self, encoder_tokens: Array, max_length: int
                         ) -> tuple[Array, Array, Array]:
    """Mask biases (self, cross) for the one query at the cached position, and that position."""
    cfg = self.config
    cache_index = self.get_variable('cache', 'cache_index')
    self.put_variable('cache', 'cache_index', cache_index + 1)
    visible = jnp.arange(max_length) <= cache_index  # the past and this position
    self_bias = mask_to_bias(visible[None, None, None, :], cfg.activation_dtype)
    cross_mask = (encoder_tokens > 0)[:, None, None, :]
    return self_bias, mask_to_bias(cross_mask, cfg.activation_dtype), cache_index


class Transformer(nn.Module):
  """The T5 encoder-decoder: token ids in, float32 logits [batch, target_length, vocab] out."""

  config: T5Config

  def setup(self) -> None:
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             *, enable_dropout: bool = True) -> Array:
    return self.encoder(encoder_input_tokens, encoder_segment_ids, not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array | None = None, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, *, enable_dropout: bool = True,
             decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Decoder logits; with ``decode=True``, one cached step (see ``Decoder``)."""
    encoder_input_tokens = with_prompt_positions(encoder_input_tokens, self.config.num_prompts)
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                        not enable_dropout or decode, decode, max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None, encoder_positions: Array | None = None,
               decoder_positions: Array | None = None, *, enable_dropout: bool = True) -> Array:
    """Logits for teacher-forced decoding.

    Positions are accepted for T5X compatibility but unused: relative position
    biases depend only on distances, which packing leaves unchanged within a segment.
    """
    del encoder_positions, decoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, enable_dropout=enable_dropout)


def stack_layers(params: Any, num_layers: dict[str, int] | None = None) -> dict[str, Any]:
  """Per-layer parameters (``encoder/layers_0/...``) -> the ``scan_layers`` layout.

  Each stack's ``layers_i`` subtrees become one ``layers`` subtree whose leaves
  hold the layers on a new leading axis. ``num_layers`` (stack -> count) checks
  the counts; by default they are read off the tree.
  """
  params = dict(params)
  for stack in [name for name in ('encoder', 'decoder') if name in params]:
    tree = dict(params[stack])
    count = sum(1 for name in tree if name.startswith('layers_'))
    if num_layers is not None and num_layers[stack] != count:
      raise ValueError(f'{stack} has {count} layers, expected {num_layers[stack]}')
    layers = [tree.pop(f'layers_{i}') for i in range(count)]
    tree['layers'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    params[stack] = tree
  return params


def unstack_layers(params: Any) -> dict[str, Any]:
  """The ``scan_layers`` layout -> per-layer parameters; the inverse of ``stack_layers``."""
  params = dict(params)
  for stack in [name for name in ('encoder', 'decoder') if name in params]:
    tree = dict(params[stack])
    stacked = tree.pop('layers')
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(count):
      tree[f'layers_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    params[stack] = tree
  return params


def merge_lora(params: Any, lora: LoraConfig) -> dict[str, Any]:
  """The parameters of the plain model that computes what the adapted one does: each kernel with
  adapters becomes ``W + scale * lora_a @ lora_b`` (per layer when scanned) and the adapters go."""
  def merge(tree: Any) -> Any:
    if not isinstance(tree, dict) and not hasattr(tree, 'items'):
      return tree
    tree = {name: merge(value) for name, value in tree.items()}
    if 'lora_a' in tree:
      delta = jnp.matmul(tree.pop('lora_a'), tree.pop('lora_b'))
      tree['kernel'] = tree['kernel'] + lora.scale * delta
    return tree
  return merge(params)
