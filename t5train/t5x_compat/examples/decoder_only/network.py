"""``t5x.examples.decoder_only.network``: T5X's decoder-only LM on t5train's.

``TransformerConfig`` (``num_layers`` decoder layers) returns t5train's ``network.T5Config``
with no encoder; ``DecoderWrapper`` is t5train's ``decoder_only_network.DecoderOnlyTransformer``
(T5X's call signature and parameter names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from t5train import network as _network
from t5train.decoder_only_network import DecoderOnlyTransformer as DecoderWrapper  # noqa: F401


def TransformerConfig(  # pylint: disable=invalid-name  (T5X's class name)
    vocab_size: int, dtype: Any = jnp.float32, emb_dim: int = 512, num_heads: int = 8,
    num_layers: int = 6, head_dim: int = 64, mlp_dim: int = 2048,
    mlp_activations: Sequence[str] = ('relu',), dropout_rate: float = 0.1,
    logits_via_embedding: bool = False) -> Any:
  """T5X's decoder-only ``TransformerConfig`` as t5train's; every field is honoured."""
  return _network.T5Config(
      vocab_size=vocab_size, dtype=dtype, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=0, num_decoder_layers=num_layers, head_dim=head_dim, mlp_dim=mlp_dim,
      mlp_activations=tuple(mlp_activations), dropout_rate=dropout_rate,
      logits_via_embedding=logits_via_embedding)


__all__ = ['DecoderWrapper', 'TransformerConfig']
