"""Name and layout mapping between Hugging Face T5 state dicts and t5train parameters.

Pure numpy, no torch import: callers pass arrays. Hugging Face stores linear
weights as [out, in] and relative-position tables as [buckets, heads];
t5train (like T5X) stores kernels as [in, out] and tables as [heads, buckets].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from t5train.network import T5Config

_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}


def _mlp_names(config: T5Config) -> dict[str, str]:
  if len(config.mlp_activations) == 1:
    return {'wi': 'wi', 'wo': 'wo'}
  return {**{f'wi_{i}': f'wi_{i}' for i in range(len(config.mlp_activations))}, 'wo': 'wo'}


def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: T5Config
                              ) -> dict[str, Any]:
  """t5train parameters (a nested dict of float32 arrays) from a Hugging Face T5 state dict."""
  get = lambda name: np.asarray(state_dict[name], np.float32)
  flat = {'token_embedder/embedding': get('shared.weight')}
  for stack, num_layers in (('encoder', config.num_encoder_layers),
                            ('decoder', config.num_decoder_layers)):
    hf_attention_names = [('SelfAttention', 'attention' if stack == 'encoder' else 'self_attention')]
    if stack == 'decoder':
      hf_attention_names.append(('EncDecAttention', 'encoder_decoder_attention'))
    norm_names = (['pre_attention_layer_norm'] if stack == 'encoder'
                  else ['pre_self_attention_layer_norm', 'pre_cross_attention_layer_norm'])
    norm_names.append('pre_mlp_layer_norm')
    flat[f'{stack}/relpos_bias/rel_embedding'] = get(
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight').T
    for i in range(num_layers):
      block = f'{stack}.block.{i}'
      for sub, (hf_name, name) in enumerate(hf_attention_names):
        for hf_proj, proj in _ATTENTION.items():
          flat[f'{stack}/layers_{i}/{name}/{proj}/kernel'] = get(
              f'{block}.layer.{sub}.{hf_name}.{hf_proj}.weight').T
      for sub, norm in enumerate(norm_names):
        flat[f'{stack}/layers_{i}/{norm}/scale'] = get(f'{block}.layer.{sub}.layer_norm.weight')
      mlp_layer = len(norm_names) - 1
      for hf_name, name in _mlp_names(config).items():
        flat[f'{stack}/layers_{i}/mlp/{name}/kernel'] = get(
            f'{block}.layer.{mlp_layer}.DenseReluDense.{hf_name}.weight').T
    flat[f'{stack}/{stack}_norm/scale'] = get(f'{stack}.final_layer_norm.weight')
  if not config.logits_via_embedding:
    flat['decoder/logits_dense/kernel'] = get('lm_head.weight').T
  return _nest(flat)
