"""Autoregressive decoding functions (pure jnp, jit-friendly).

A decode function takes ``logits_fn(decoder_input_tokens [batch, length]) ->
logits [batch, length, vocab]`` and returns tokens [batch, length]. Decoding
starts from BOS (id 0) and pads with 0 after EOS.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def shift_right(tokens: Array) -> Array:
  """Decoder inputs for ``tokens``: BOS (0) first, the last token dropped."""
  return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def greedy_decode(logits_fn: LogitsFn, batch_size: int, max_decode_length: int,
                  eos_id: int = 1) -> Array:
  """Argmax decoding by re-running the decoder over the prefix at every step.

  Costs ``max_decode_length`` full decoder passes; it is the simple reference
  that faster cached decoders must agree with.
  """
  tokens = jnp.zeros((batch_size, max_decode_length), jnp.int32)
  done = jnp.zeros((batch_size,), bool)

  def step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
    tokens, done = carry
    logits = logits_fn(shift_right(tokens))
    next_token = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
    next_token = jnp.where(done, 0, next_token)
    tokens = tokens.at[:, i].set(next_token)
    return tokens, done | (next_token == eos_id)

  tokens, _ = jax.lax.fori_loop(0, max_decode_length, step, (tokens, done))
  return tokens
