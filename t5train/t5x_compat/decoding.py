"""``t5x.decoding``: T5X's decoding functions' settings on t5train's decoders.

Models call a decode function with t5train's arguments (``tokens_to_logits, cache,
batch_size, max_decode_length, eos_id, ...``); what a gin file binds are T5X's settings
(``temperature``, ``topk``, ``num_decodes``, ``alpha``, ...), which these functions take.
"""

from __future__ import annotations

from typing import Any

from t5train import decoding as _decoding
from t5train.decoding import NEG_INF  # noqa: F401
from t5train.t5x_compat._args import require


def temperature_sample(tokens_to_logits: Any, cache: Any, batch_size: int,
                       max_decode_length: int, eos_id: int, *, decode_rng: Any = None,
                       num_decodes: int = 1, temperature: float = 1.0, topk: int = 1,
                       topp: float = 0.0, cache_offset: int = 0, initial_index: Any = None,
                       max_decode_steps: int | None = None,
                       max_decode_steps_hard_limit: int | None = None,
                       rescale_log_probs: bool = True, state_callback_fn: Any = None,
                       logit_callback_fn: Any = None, **model_args: Any) -> Any:
  """T5X's ``temperature_sample`` settings on t5train's sampler (greedy with ``topk=1``).

  ``rescale_log_probs`` is accepted: the samples are the same, and the scores are the model's
  log-likelihood of them (T5X's ``rescale_log_probs=False``). Prompts are handled by the model
  (``initial_index``); ``cache_offset``, ``max_decode_steps`` and the callbacks are refused.
  """
  del rescale_log_probs
  require('temperature_sample.cache_offset', cache_offset, 0, 'no cache offset')
  require('temperature_sample.initial_index', initial_index, None,
          'the model passes the prompt lengths itself')
  require('temperature_sample.max_decode_steps', max_decode_steps, None,
          'decoding runs to the targets length of TASK_FEATURE_LENGTHS')
  require('temperature_sample.max_decode_steps_hard_limit', max_decode_steps_hard_limit, None,
          'decoding runs to the targets length of TASK_FEATURE_LENGTHS')
  require('temperature_sample.state_callback_fn', state_callback_fn, None, 'no callbacks')
  require('temperature_sample.logit_callback_fn', logit_callback_fn, None, 'no callbacks')
  return _decoding.temperature_sample(tokens_to_logits, cache, batch_size, max_decode_length,
                                      eos_id, decode_rng=decode_rng, num_decodes=num_decodes,
                                      temperature=temperature, topk=topk, topp=topp,
                                      **model_args)


def beam_search(tokens_to_logits: Any, cache: Any, batch_size: int, max_decode_length: int,
                eos_id: int, *, num_decodes: int = 4, alpha: float = 0.6,
                max_decode_len: int | None = None, max_decode_step: int = -1,
                min_log_prob: float = _decoding.NEG_INF, decode_rng: Any = None,
                cache_offset: int = 0, initial_index: Any = None, **model_args: Any) -> Any:
  """T5X's ``beam_search`` settings on t5train's beam search (``num_decodes`` beams,
  brevity penalty ``alpha``); ``min_log_prob`` is accepted (beams are ranked the same)."""
  del min_log_prob
  require('beam_search.max_decode_len', max_decode_len, None,
          'decoding runs to the targets length of TASK_FEATURE_LENGTHS')
  require('beam_search.max_decode_step', max_decode_step, -1,
          'decoding runs to the targets length of TASK_FEATURE_LENGTHS')
  require('beam_search.cache_offset', cache_offset, 0, 'no cache offset')
  require('beam_search.initial_index', initial_index, None,
          'the model passes the prompt lengths itself')
  return _decoding.beam_search(tokens_to_logits, cache, batch_size, max_decode_length, eos_id,
                               num_decodes=num_decodes, alpha=alpha, decode_rng=decode_rng,
                               **model_args)


__all__ = ['beam_search', 'temperature_sample']
