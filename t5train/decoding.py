"""Autoregressive decoding: temperature sampling (greedy, top-k, top-p) and beam search.

Both take ``tokens_to_logits(tokens [n, 1], cache) -> (logits [n, vocab], cache)``,
which runs one decoder step and returns the updated cache, and loop with
``lax.while_loop`` until every row has emitted EOS or ``max_decode_length``
tokens. The cache comes with one row per example; each leaf with that leading
dimension is repeated ``num_decodes`` times, example-major (row
``i * num_decodes + j`` is decode ``j`` of example ``i``), and reordered with the
beams; other leaves (a step counter) are left as they are. Leaves under a key that
starts with ``cross`` (the projected encoder outputs) are the same for every
decode of an example, so they keep one row per example and are never repeated
or reordered; so are leaves under a key that starts with ``prompt`` (a decoder-only
model's prompt keys and values). ``tokens_to_logits`` sees ``batch_size * num_decodes``
token rows. Outputs are ``[batch, num_decodes, length]`` token ids, 0 after EOS, and
``[batch, num_decodes]`` scores, best first.

A decoder-only model continues a prompt whose keys and values are already in the
cache: ``first_tokens`` [batch] are the tokens fed at the first step (the prompt's
last; BOS, 0, by default) and ``max_lengths`` [batch] how many tokens each example
may produce before its cache is full (``max_decode_length`` by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from t5train.errors import UserError

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]
NEG_INF = -1.0e7


def shift_right(tokens: Array) -> Array:
  """Decoder inputs for ``tokens``: BOS (0) first, the last token dropped."""
  return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


_PER_EXAMPLE_CACHE = ('cross', 'prompt')


def _same_for_every_beam(path: tuple) -> bool:
  """Whether a cache leaf holds per-example values: cross-attention keys and values, or a
  decoder-only model's prompt."""
  return any(str(getattr(key, 'key', '')).startswith(_PER_EXAMPLE_CACHE) for key in path)


def _expand_rows(cache: Cache, batch_size: int, num_decodes: int) -> Cache:
  """Repeats every per-decode leaf with ``batch_size`` leading rows ``num_decodes`` times,
  example-major; per-example leaves keep one row per example."""
  def expand(path: tuple, x: Any) -> Any:
    if (num_decodes > 1 and getattr(x, 'ndim', 0) >= 1 and x.shape[0] == batch_size
        and not _same_for_every_beam(path)):
      return jnp.repeat(x, num_decodes, axis=0)
    return x
  return jax.tree_util.tree_map_with_path(expand, cache)


def _filter_top_k(logits: Array, top_k: int) -> Array:
  """Logits outside the ``top_k`` largest of each row set to NEG_INF (ties at the edge kept)."""
  kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def _filter_top_p(logits: Array, top_p: float) -> Array:
  """Keeps the smallest set of most likely tokens whose probabilities sum to at least ``top_p``."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  sorted_keep = before < top_p
  keep = jnp.zeros_like(sorted_keep).at[jnp.arange(logits.shape[0])[:, None], order].set(
      sorted_keep)
  return jnp.where(keep, logits, NEG_INF)


def sampling_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """The logits that a sample is drawn from, after temperature, top-k and top-p."""
  logits = logits / temperature
  if top_k:
    logits = _filter_top_k(logits, top_k)
  if 0.0 < top_p < 1.0:
    logits = _filter_top_p(logits, top_p)
  return logits


def _per_example(values: Array | None, batch_size: int, default: int) -> Array:
  """``values`` [batch] as int32, or ``default`` for every example."""
  if values is None:
    return jnp.full((batch_size,), default, jnp.int32)
  return jnp.asarray(values, jnp.int32).reshape(batch_size)


def check_sampling(temperature: float, topk: int, topp: float, num_decodes: int) -> None:
  """A UserError for sampling settings outside their ranges, which would otherwise invert the
  distribution (a negative temperature) or be ignored (``topp`` outside [0, 1])."""
  problems = [f'{name} = {value!r} ({rule})' for name, value, bad, rule in (
      ('temperature', temperature, temperature < 0, 'must be >= 0; 0 is greedy'),
      ('topk', topk, topk < 0 or topk != int(topk), 'must be an integer >= 0; 0 is no top-k'),
      ('topp', topp, not 0 <= topp <= 1, 'must be in [0, 1]; 0 and 1 are no nucleus'),
      ('num_decodes', num_decodes, num_decodes < 1, 'must be >= 1')) if bad]
  if problems:
    raise UserError(f"decoding.temperature_sample: {'; '.join(problems)}")


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                       max_decode_length: int, eos_id: int, *, decode_rng: Array | None = None,
                       num_decodes: int = 1, temperature: float = 1.0, topk: int = 1,
                       topp: float = 0.0, first_tokens: Array | None = None,
                       max_lengths: Array | None = None) -> tuple[Array, Array]:
  """Samples ``num_decodes`` continuations per example; scores are their log-likelihoods.

  As in T5X, the default ``topk=1`` is greedy decoding, and so is ``temperature=0``.
  ``topk=0`` samples from the whole vocabulary; ``0 < topp < 1`` samples from the
  nucleus. Scores are under the model's own distribution, not the filtered one.
  Without ``decode_rng`` it samples with ``PRNGKey(0)``.
  """
  check_sampling(temperature, topk, topp, num_decodes)
  rows = batch_size * num_decodes
  cache = _expand_rows(cache, batch_size, num_decodes)
  first = jnp.repeat(_per_example(first_tokens, batch_size, 0), num_decodes)
  limit = jnp.repeat(_per_example(max_lengths, batch_size, max_decode_length), num_decodes)
  greedy = temperature == 0.0
  if decode_rng is None:
    decode_rng = jax.random.PRNGKey(0)  # as T5X: the same samples on every call without one

  def cond(state: tuple) -> Array:
    index, _, _, done, _, _, _ = state
    return (index < max_decode_length) & ~jnp.all(done)

  def body(state: tuple) -> tuple:
    index, tokens, current, done, log_prob, cache, rng = state
    logits, cache = tokens_to_logits(current[:, None], cache)
    logits = logits.astype(jnp.float32)
    rng, step_rng = jax.random.split(rng)
    if greedy:
      chosen = jnp.argmax(logits, axis=-1)
    else:
      chosen = jax.random.categorical(step_rng, sampling_logits(logits, temperature, topk, topp))
    chosen = jnp.where(done, 0, chosen).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
    log_prob = log_prob + jnp.where(done, 0.0, token_log_prob)
    tokens = jax.lax.dynamic_update_slice(tokens, chosen[:, None], (0, index))
    done = done | (chosen == eos_id) | (index + 1 >= limit)
    return index + 1, tokens, chosen, done, log_prob, cache, rng

  init = (jnp.zeros((), jnp.int32), jnp.zeros((rows, max_decode_length), jnp.int32),
          first, limit <= 0, jnp.zeros((rows,), jnp.float32), cache, decode_rng)
  _, tokens, _, _, log_prob, _, _ = jax.lax.while_loop(cond, body, init)
  tokens = tokens.reshape(batch_size, num_decodes, max_decode_length)
  log_prob = log_prob.reshape(batch_size, num_decodes)
  order = jnp.argsort(-log_prob, axis=-1)
  return (jnp.take_along_axis(tokens, order[:, :, None], axis=1),
          jnp.take_along_axis(log_prob, order, axis=1))


def brevity_penalty(alpha: float, length: Array) -> Array:
  """T5X's (Google NMT's) length penalty: ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + length.astype(jnp.float32)) / 6.0, alpha)


def _gather_beams(tree: Any, beam_indices: Array, batch_size: int, old_beams: int) -> Any:
  """Reorders every leaf with ``batch_size * old_beams`` rows by ``beam_indices`` [batch, new].

  Beams are only ever picked from their own example, so per-example leaves are not touched.
  """
  flat = (beam_indices + old_beams * jnp.arange(batch_size)[:, None]).reshape(-1)

  def gather(path: tuple, x: Any) -> Any:
    if (getattr(x, 'ndim', 0) >= 1 and x.shape[0] == batch_size * old_beams
        and not _same_for_every_beam(path)):
      return x.at[flat].get(mode='promise_in_bounds')
    return x
  return jax.tree_util.tree_map_with_path(gather, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch_size: int,
                max_decode_length: int, eos_id: int, *, num_decodes: int = 4, alpha: float = 0.6,
                decode_rng: Array | None = None, first_tokens: Array | None = None,
                max_lengths: Array | None = None) -> tuple[Array, Array]:
  """Beam search with ``num_decodes`` beams; scores are log-likelihood / brevity_penalty.

  A hypothesis ends when it emits EOS among the ``num_decodes`` best candidates of
  its step (as in Hugging Face's beam search), or at ``max_decode_length``; so one
  beam with ``alpha=0`` is greedy decoding. The search stops early once no live
  beam can beat the finished ones.
  """
  del decode_rng  # deterministic
  beams, vocab_rows = num_decodes, batch_size * num_decodes
  cache = _expand_rows(cache, batch_size, num_decodes)
  max_penalty = brevity_penalty(alpha, jnp.asarray(max_decode_length))
  first = jnp.broadcast_to(_per_example(first_tokens, batch_size, 0)[:, None], (batch_size, beams))
  limit = _per_example(max_lengths, batch_size, max_decode_length)[:, None]

  def cond(state: dict) -> Array:
    best_possible = state['live_log_prob'][:, 0] / max_penalty
    worst_finished = jnp.where(state['finished_flags'], state['finished_scores'], NEG_INF).min(-1)
    can_improve = ~jnp.all(state['finished_flags'], -1) | (best_possible > worst_finished)
    return (state['index'] < max_decode_length) & jnp.any(can_improve)

  def body(state: dict) -> dict:
    index = state['index']
    last = jnp.where(index == 0, first, jax.lax.dynamic_index_in_dim(
        state['live_seqs'], jnp.maximum(index - 1, 0), axis=2, keepdims=False))
    logits, cache = tokens_to_logits(last.reshape(vocab_rows, 1), state['cache'])
    logits = logits.astype(jnp.float32)
    # The best 2 x beams candidates of an example are among the best 2 x beams tokens of each
    # of its beams: only those are normalised and ranked, not beams x vocab of them (ties
    # still go to the lower beam, then the lower token id).
    per_row = min(2 * beams, logits.shape[-1])
    row_top, row_token = jax.lax.top_k(logits, per_row)
    row_log_prob = row_top - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    candidates = (state['live_log_prob'].reshape(vocab_rows, 1) + row_log_prob
                  ).reshape(batch_size, -1)
    top_log_prob, top_index = jax.lax.top_k(candidates, 2 * beams)
    top_beam = top_index // per_row
    top_token = jnp.take_along_axis(row_token.reshape(batch_size, -1), top_index, axis=1
                                    ).astype(jnp.int32)
    top_seqs = jnp.take_along_axis(state['live_seqs'], top_beam[:, :, None], axis=1)
    top_seqs = jax.lax.dynamic_update_slice(
        top_seqs, top_token[:, :, None], (0, 0, index))
    is_eos = top_token == eos_id
    at_end = index + 1 >= limit  # [batch, 1]
    # Finished: EOS among the best `beams` candidates, or any candidate at the last position.
    rank_ok = jnp.arange(2 * beams)[None, :] < beams
    ends = (is_eos & rank_ok) | (at_end & rank_ok)
    new_scores = jnp.where(ends, top_log_prob / brevity_penalty(alpha, index + 1), NEG_INF)
    all_scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)
    all_flags = jnp.concatenate([state['finished_flags'], ends], axis=1)
    all_seqs = jnp.concatenate([state['finished_seqs'], top_seqs], axis=1)
    keep_scores, keep = jax.lax.top_k(jnp.where(all_flags, all_scores, NEG_INF * 2), beams)
    finished_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
    finished_flags = jnp.take_along_axis(all_flags, keep, axis=1)
    # Live: the best candidates that did not emit EOS.
    live_scores, live = jax.lax.top_k(jnp.where(is_eos, NEG_INF * 2, top_log_prob), beams)
    live_scores = jnp.where(at_end, NEG_INF * 2, live_scores)  # nothing continues past its end
    live_seqs = jnp.take_along_axis(top_seqs, live[:, :, None], axis=1)
    parent = jnp.take_along_axis(top_beam, live, axis=1)
    return {'index': index + 1, 'cache': _gather_beams(cache, parent, batch_size, beams),
            'live_seqs': live_seqs, 'live_log_prob': live_scores,
            'finished_seqs': finished_seqs, 'finished_scores': keep_scores,
            'finished_flags': finished_flags}

  # At the start only beam 0 is live, so the first step does not pick one token `beams` times.
  init_live = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (beams - 1)), (batch_size, 1))
  init = {'index': jnp.zeros((), jnp.int32), 'cache': cache,
          'live_seqs': jnp.zeros((batch_size, beams, max_decode_length), jnp.int32),
          'live_log_prob': init_live,
          'finished_seqs': jnp.zeros((batch_size, beams, max_decode_length), jnp.int32),
          'finished_scores': jnp.full((batch_size, beams), NEG_INF),
          'finished_flags': jnp.zeros((batch_size, beams), bool)}
  final = jax.lax.while_loop(cond, body, init)
  return final['finished_seqs'], final['finished_scores']
