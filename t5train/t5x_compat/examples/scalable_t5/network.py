"""``t5x.examples.scalable_t5.network``: T5X's scanned, rematerialised T5 on t5train's.

T5X's ``remat_policy`` names map to t5train's: ``'minimal'`` (T5X keeps the matmul outputs
without batch dimensions) is ``'dots_saveable'``, ``'full'`` is ``'full'``, ``'none'`` is
``'none'``. ``scan_layers`` is honoured (one ``nn.scan`` per stack). ``param_scan_axis`` is
where T5X stacks the scanned layers of each parameter; t5train stacks them on a leading
``layers`` axis, which changes the memory layout only (T5X's scanned checkpoints, axis 1, are
read as they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from t5train import network as _network
from t5train.errors import UserError
from t5train.network import Transformer  # noqa: F401

REMAT_POLICIES = {'minimal': 'dots_saveable', 'full': 'full', 'none': 'none', None: 'none'}


def T5Config(  # pylint: disable=invalid-name  (T5X's class name)
    vocab_size: int, dtype: Any = jnp.float32, emb_dim: int = 512, num_heads: int = 8,
    num_encoder_layers: int = 6, num_decoder_layers: int = 6, head_dim: int = 64,
    mlp_dim: int = 2048, mlp_activations: Sequence[str] = ('relu',), dropout_rate: float = 0.1,
    logits_via_embedding: bool = False, remat_policy: str | None = 'none',
    scan_layers: bool = True, param_scan_axis: int = 1) -> Any:
  """T5X's scalable ``T5Config`` as t5train's ``network.T5Config``."""
  if remat_policy not in REMAT_POLICIES:
    raise UserError(f"T5Config.remat_policy = {remat_policy!r}: T5X's policies are 'minimal', "
                    "'full' and 'none'")
  if param_scan_axis not in (0, 1):
    raise UserError(f'T5Config.param_scan_axis = {param_scan_axis}: T5X stacks scanned layers '
                    'on axis 0 or 1')
  return _network.T5Config(
      vocab_size=vocab_size, dtype=dtype, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
      head_dim=head_dim, mlp_dim=mlp_dim, mlp_activations=tuple(mlp_activations),
      dropout_rate=dropout_rate, logits_via_embedding=logits_via_embedding,
      scan_layers=scan_layers, remat_policy=REMAT_POLICIES[remat_policy])


__all__ = ['REMAT_POLICIES', 'T5Config', 'Transformer']
