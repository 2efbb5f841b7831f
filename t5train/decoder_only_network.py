"""The T5 decoder-only language model (T5X's ``examples/decoder_only``) as Flax modules.

T5 decoder blocks without cross-attention, one causal relative-position table
for the stack, and T5X's parameter paths (``decoder/token_embedder/embedding``,
``decoder/layers_0/self_attention/query/kernel``, ``decoder/decoder_norm/scale``),
so T5X decoder-only checkpoints line up. The depth is ``T5Config.num_decoder_layers``;
``num_encoder_layers`` is unused. A prefix LM passes ``decoder_causal_attention``
(1 on the inputs part): those positions attend to each other in both directions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5train import network
from t5train.network import Array, T5Config


class DecoderOnlyStack(nn.Module):
  """Embedding, decoder layers, final norm and logits, under one ``decoder`` scope.

  Decoding runs in two kinds of ``decode=True`` calls. The first, with the whole
  sequence [batch, length] (the prompt, zeros after it), creates the cache: every
  layer stores its keys and values of all positions, computed in one pass with
  the prompt's (prefix-LM) mask, of which each example's first ``prefill_lengths``
  are its prompt, and room for ``max_decode_length`` generated positions (default:
  the length). Each later call takes one token per row [rows, 1] (several decodes
  of an example, such as beams, are consecutive rows that share its prompt), writes
  it at the step's generated position and returns the logits of the next token; it
  is given the same ``max_decode_length``, which no decode passes.

  With ``num_prompts`` (prompt tuning), N learned embeddings (``decoder/prompt/prompt``) come
  before every sequence: they belong to the prefix (bidirectional in a prefix LM), the cache
  holds them in front of the sequence, and the logits are those of the sequence alone.
  """

  config: T5Config

  @nn.compact
  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array | None,
               decoder_segment_ids: Array | None, decoder_causal_attention: Array | None,
               deterministic: bool, decode: bool = False, max_decode_length: int | None = None,
               prefill_lengths: Array | None = None) -> Array:
    cfg = self.config
    num_prompts = cfg.num_prompts
    if num_prompts and decoder_segment_ids is not None:
      raise ValueError('prompt tuning prepends the prompts to each sequence; pack=False is needed')
    embedding = network.Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype,
                              name='token_embedder')
    y = embedding(decoder_input_tokens)
    cache_index = None
    decode_step = decode and self.has_variable('cache', 'cache_index')
    generated_length = max_decode_length or decoder_input_tokens.shape[1]
    if decode_step:
      if max_decode_length is None:
        raise ValueError('a decoding step needs max_decode_length, the generated positions the '
                         'cache holds')
      bias, buckets, cache_index = self._decode_step_bias(max_decode_length)
    else:
      rows = decoder_input_tokens.shape[0]
      if num_prompts:
        y = jnp.concatenate([network.Prompts(num_prompts, cfg.emb_dim, cfg.activation_dtype,
                                             name='prompt')(rows), y], axis=1)
        decoder_target_tokens = network.with_prompt_positions(decoder_target_tokens, num_prompts)
        if decoder_causal_attention is not None:
          decoder_causal_attention = network.with_prompt_positions(decoder_causal_attention,
                                                                   num_prompts)
      length = y.shape[1]
      if decode:  # creating the cache from the prompt
        start = jnp.zeros((rows,), jnp.int32) if prefill_lengths is None else prefill_lengths
        first_generated = start.astype(jnp.int32) + num_prompts
        self.put_variable('cache', 'prompt_offsets',
                          jnp.arange(length, dtype=jnp.int32)[None, :] - first_generated[:, None])
        self.put_variable('cache', 'cache_index', jnp.zeros((), jnp.int32))
      mask = network.attention_mask(decoder_target_tokens, decoder_target_tokens,
                                    decoder_segment_ids, decoder_segment_ids, causal=True,
                                    bidirectional_region=decoder_causal_attention)
      bias = network.mask_to_bias(mask, cfg.activation_dtype)
      buckets = self._buckets(length)
    layer_buckets = buckets if cfg.relative_attention_per_layer else None
    if layer_buckets is None:
      table = network.relative_position_table(cfg)
      bias = network.add_bias(bias, jax.tree_util.tree_map(table, buckets))
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    y = dropout(y, deterministic=deterministic)
    y = nn.with_logical_constraint(y, ('batch', 'length', 'embed'))
    y = network.run_layers(network.DecoderLayer, cfg, cfg.num_decoder_layers, (5, 6, 9), y, None,
                           bias, None, deterministic, decode, cache_index, layer_buckets,
                           generated_length)
    y = network.LayerNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='decoder_norm')(y)
    y = dropout(y, deterministic=deterministic)
    logits = network.output_logits(cfg, embedding, y)
    return logits if decode_step else logits[:, num_prompts:]

  def _buckets(self, length: int) -> Array:
    cfg = self.config
    return jnp.asarray(network.position_buckets(length, length, False,
                                                cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance))

  def _decode_step_bias(self, generated_length: int
                        ) -> tuple[network.PromptCacheBias, network.PromptCacheBias, Array]:
    """The step's mask bias and relative-position bucket ids over the two parts of the cache
    (the prompt's positions, the generated ones) for each example's one query, and the step."""
    step = self.get_variable('cache', 'cache_index')
    self.put_variable('cache', 'cache_index', step + 1)
    # Each prompt position less the example's first generated one: < 0 on its prompt.
    offsets = self.get_variable('cache', 'prompt_offsets')
    generated = jnp.arange(generated_length, dtype=jnp.int32)
    dtype = self.config.activation_dtype
    bias = network.PromptCacheBias(
        network.mask_to_bias((offsets < 0)[:, None, None, :], dtype),
        network.mask_to_bias((generated <= step)[None, None, None, :], dtype))
    # Key minus query positions; the query sits `step` after the example's first generated one.
    span = offsets.shape[1] + generated_length
    buckets = network.PromptCacheBias(self._distance_buckets(offsets - step, span)[:, None, :],
                                      self._distance_buckets(generated - step, span)[None, :])
    return bias, buckets, step

  def _distance_buckets(self, distances: Array, span: int) -> Array:
    """Causal bucket ids of key - query distances (at most ``span`` back; later keys get
    bucket 0, as the distance 0 does)."""
    cfg = self.config
    table = network.relative_position_bucket(np.arange(-span, 1, dtype=np.int32), False,
                                             cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance)
    return jnp.take(jnp.asarray(table), distances + span, mode='clip')


class DecoderOnlyTransformer(nn.Module):
  """A decoder-only (causal or prefix) LM: token ids in, float32 logits [batch, length, vocab] out.

  The call signature is T5X's ``DecoderWrapper``'s. Positions are accepted for
  T5X compatibility but unused: relative position biases depend only on distances,
  which packing leaves unchanged within a segment.
  """

  config: T5Config

  def setup(self) -> None:
    self.decoder = DecoderOnlyStack(self.config)

  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array | None = None,
               decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: int | None = None,
               prefill_lengths: Array | None = None) -> Array:
    """Teacher-forced logits, or with ``decode=True`` a cache-creating or cached step (see
    ``DecoderOnlyStack``). Padding is read off ``decoder_target_tokens``."""
    del decoder_positions
    if decoder_target_tokens is None:
      decoder_target_tokens = jnp.ones_like(decoder_input_tokens)
    return self.decoder(decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
                        decoder_causal_attention, not enable_dropout or decode, decode,
                        max_decode_length, prefill_lengths)

