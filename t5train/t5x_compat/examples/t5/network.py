"""``t5x.examples.t5.network``: T5X's T5 1.0/1.1 network on t5train's ``network``.

``T5Config`` takes T5X's fields and returns t5train's ``network.T5Config``; ``Transformer``
is t5train's (the same parameter names as T5X's, so checkpoints line up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from t5train import network as _network
from t5train.network import Transformer  # noqa: F401


def T5Config(  # pylint: disable=invalid-name  (T5X's class name)
    vocab_size: int, dtype: Any = jnp.float32, emb_dim: int = 512, num_heads: int = 8,
    num_encoder_layers: int = 6, num_decoder_layers: int = 6, head_dim: int = 64,
    mlp_dim: int = 2048, mlp_activations: Sequence[str] = ('relu',), dropout_rate: float = 0.1,
    logits_via_embedding: bool = False, float32_attention_logits: bool = False) -> Any:
  """T5X's ``T5Config`` (t5x/examples/t5) as t5train's; every field is honoured."""
  return _network.T5Config(
      vocab_size=vocab_size, dtype=dtype, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
      head_dim=head_dim, mlp_dim=mlp_dim, mlp_activations=tuple(mlp_activations),
      dropout_rate=dropout_rate, logits_via_embedding=logits_via_embedding,
      float32_attention_logits=float32_attention_logits)


__all__ = ['T5Config', 'Transformer']
