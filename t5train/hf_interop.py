"""Hugging Face T5 / mT5 / umT5 <-> t5train: parameter names and layouts, and config.json <->
T5Config.

Pure numpy and dicts, no torch or transformers import: callers pass arrays and
parsed JSON. Hugging Face stores linear weights as [out, in] and relative
position tables as [buckets, heads]; t5train (like T5X) stores kernels as
[in, out] and tables as [heads, buckets].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from t5train.errors import UserError
from t5train.network import T5Config

_ATTENTION = {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'}
# transformers' feed_forward_proj -> t5train mlp_activations. Its plain 'gelu' is the exact
# GELU, which t5train does not implement; 'gated-gelu' uses the tanh approximation, as t5train.
_ACTIVATIONS = {
    'relu': ('relu',),
    'gated-gelu': ('gelu', 'linear'),
    'gated-relu': ('relu', 'linear'),
    'gated-silu': ('silu', 'linear'),
}
SUPPORTED_MODEL_TYPES = ('t5', 'mt5', 'umt5')
# umT5 gives every layer's self-attention its own relative-position table.
PER_LAYER_RELPOS_MODEL_TYPE = 'umt5'


def _mlp_names(config: T5Config) -> list[str]:
  if len(config.mlp_activations) == 1:
    return ['wi', 'wo']
  return [f'wi_{i}' for i in range(len(config.mlp_activations))] + ['wo']


def name_pairs(config: T5Config) -> list[tuple[str, str]]:
  """(t5train parameter path, Hugging Face tensor name) for every parameter of ``config``."""
  pairs = [('token_embedder/embedding', 'shared.weight')]
  for stack, num_layers in (('encoder', config.num_encoder_layers),
                            ('decoder', config.num_decoder_layers)):
    attentions = [('SelfAttention', 'attention' if stack == 'encoder' else 'self_attention')]
    norms = ['pre_attention_layer_norm' if stack == 'encoder' else 'pre_self_attention_layer_norm']
    if stack == 'decoder':
      attentions.append(('EncDecAttention', 'encoder_decoder_attention'))
      norms.append('pre_cross_attention_layer_norm')
    norms.append('pre_mlp_layer_norm')
    if not config.relative_attention_per_layer:
      pairs.append((f'{stack}/relpos_bias/rel_embedding',
                    f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'))
    for i in range(num_layers):
      block = f'{stack}.block.{i}'
      if config.relative_attention_per_layer:
        pairs.append((f'{stack}/layers_{i}/relpos_bias/rel_embedding',
                      f'{block}.layer.0.SelfAttention.relative_attention_bias.weight'))
      for sub, (hf_name, name) in enumerate(attentions):
        for hf_proj, proj in _ATTENTION.items():
          pairs.append((f'{stack}/layers_{i}/{name}/{proj}/kernel',
                        f'{block}.layer.{sub}.{hf_name}.{hf_proj}.weight'))
      for sub, norm in enumerate(norms):
        pairs.append((f'{stack}/layers_{i}/{norm}/scale', f'{block}.layer.{sub}.layer_norm.weight'))
      for name in _mlp_names(config):
        pairs.append((f'{stack}/layers_{i}/mlp/{name}/kernel',
                      f'{block}.layer.{len(norms) - 1}.DenseReluDense.{name}.weight'))
    pairs.append((f'{stack}/{stack}_norm/scale', f'{stack}.final_layer_norm.weight'))
  if not config.logits_via_embedding:
    pairs.append(('decoder/logits_dense/kernel', 'lm_head.weight'))
  return pairs


def _transposed(path: str, value: np.ndarray) -> np.ndarray:
  # Kernels and the relative-position table are stored transposed; embeddings and scales are not.
  return value.T if path.endswith('/kernel') or path.endswith('/rel_embedding') else value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def flat_params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: T5Config
                                   ) -> dict[str, np.ndarray]:
  """t5train parameters keyed by path ('encoder/layers_0/...'), float32, from a HF state dict."""
  missing = [hf for _, hf in name_pairs(config) if hf not in state_dict]
  if missing:
    raise UserError(f'the Hugging Face weights lack {", ".join(missing[:3])}'
                    f'{" ..." if len(missing) > 3 else ""}; they do not match config.json')
  return {path: np.ascontiguousarray(_transposed(path, np.asarray(state_dict[hf], np.float32)))
          for path, hf in name_pairs(config)}


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: T5Config
                              ) -> dict[str, Any]:
  """t5train parameters (a nested dict of float32 arrays) from a Hugging Face T5 state dict."""
  return nest(flat_params_from_hf_state_dict(state_dict, config))


def hf_state_dict_from_flat_params(flat: Mapping[str, np.ndarray], config: T5Config
                                   ) -> dict[str, np.ndarray]:
  """The Hugging Face state dict (contiguous arrays, dtypes kept) of t5train parameters."""
  return {hf: np.ascontiguousarray(_transposed(path, np.asarray(flat[path])))
          for path, hf in name_pairs(config)}


def scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
  """Whether transformers 5 multiplies the decoder's output by d_model**-0.5 before the output
  layer, as it decides it. Its T5 and umT5 configs record the v1.0 scaling as
  scale_decoder_outputs; a config.json without that key (transformers 4's) scales unless it says
  tie_word_embeddings=false. Its mT5 never scales, whatever its config says."""
  if hf_config.get('model_type') == 'mt5':
    return False
  if 'scale_decoder_outputs' in hf_config:
    return bool(hf_config['scale_decoder_outputs'])
  return hf_config.get('tie_word_embeddings') is not False


def declares_untied(hf_config: Mapping[str, Any]) -> bool:
  """Whether config.json says that the weights hold their own lm_head.weight. transformers 5
  always writes tie_word_embeddings=true and leaves lm_head.weight out of a file where it is the
  shared embedding; only transformers 4 (or a hand-written file) writes false."""
  return hf_config.get('tie_word_embeddings') is False


def t5_config_from_hf_config(hf_config: Mapping[str, Any], dtype: str = 'float32') -> T5Config:
  """The T5Config of a transformers T5 / mT5 / ByT5 / umT5 config.json; UserError if
  unsupported. Its output layer is the embedding when transformers scales the decoder's output
  (T5 v1.0's layout); ``model_from_hf`` settles that with the weights."""
  model_type = hf_config.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(f'unsupported model_type {model_type!r} in config.json; the converter reads '
                    f'{", ".join(SUPPORTED_MODEL_TYPES)} (T5 v1.0, v1.1, mT5, ByT5 and umT5)')
  projection = hf_config.get('feed_forward_proj', 'relu')
  if projection not in _ACTIVATIONS:
    raise UserError(f'unsupported feed_forward_proj {projection!r}; supported: '
                    f'{", ".join(_ACTIVATIONS)}')
  try:
    return T5Config(
        vocab_size=int(hf_config['vocab_size']), dtype=dtype, emb_dim=int(hf_config['d_model']),
        num_heads=int(hf_config['num_heads']), num_encoder_layers=int(hf_config['num_layers']),
        num_decoder_layers=int(hf_config.get('num_decoder_layers') or hf_config['num_layers']),
        head_dim=int(hf_config['d_kv']), mlp_dim=int(hf_config['d_ff']),
        mlp_activations=_ACTIVATIONS[projection], dropout_rate=0.0,
        logits_via_embedding=scales_decoder_outputs(hf_config),
        relative_attention_num_buckets=int(hf_config.get('relative_attention_num_buckets', 32)),
        relative_attention_max_distance=int(hf_config.get('relative_attention_max_distance', 128)),
        relative_attention_per_layer=model_type == PER_LAYER_RELPOS_MODEL_TYPE,
        layer_norm_epsilon=float(hf_config.get('layer_norm_epsilon', 1e-6)))
  except KeyError as e:
    raise UserError(f'config.json lacks {e.args[0]!r}') from e


def model_from_hf(hf_config: Mapping[str, Any], config: T5Config,
                  state_dict: Mapping[str, np.ndarray]) -> tuple[T5Config, dict[str, np.ndarray]]:
  """The T5Config and the t5train parameters (flat, float32) of a Hugging Face model directory's
  config.json and weights, with transformers 5's logits. ``config`` is
  ``t5_config_from_hf_config(hf_config)`` (made first, so that an unsupported config.json stops
  before the weights are read).

  transformers 5 ties every T5 / mT5 / umT5 output layer to the shared embedding unless the file
  holds an lm_head.weight of its own, and scales the decoder's output as
  ``scales_decoder_outputs`` says. t5train's tied output layer always scales (T5 v1.0), so:
  tied and scaled -> tied; tied and unscaled (an mT5, or a T5 / umT5 built with
  tie_word_embeddings=False) -> an untied output layer holding a copy of the embedding; an
  lm_head.weight of its own, scaled -> untied, the scale folded into the kernel; unscaled ->
  untied. A config.json that says tie_word_embeddings=false needs lm_head.weight (UserError).
  """
  scaled = scales_decoder_outputs(hf_config)
  state = dict(state_dict)
  head = state.pop('lm_head.weight', None)
  shared = state.get('shared.weight')
  if head is not None and shared is not None and scaled and np.array_equal(head, shared):
    head = None  # tied, and saved all the same (transformers 4 wrote both)
  if head is None and not declares_untied(hf_config):  # the output layer is the embedding
    if not scaled and shared is not None:
      state['lm_head.weight'] = shared
  else:  # its own output layer; without lm_head.weight, flat_params_from_hf_state_dict says so
    config = dataclasses.replace(config, logits_via_embedding=False)
    if head is not None:
      state['lm_head.weight'] = (np.asarray(head, np.float32) * np.float32(config.emb_dim ** -0.5)
                                 if scaled else head)
  return config, flat_params_from_hf_state_dict(state, config)


def hf_config_from_t5_config(config: T5Config) -> dict[str, Any]:
  """A config.json for ``transformers.T5ForConditionalGeneration``, or
  ``UMT5ForConditionalGeneration`` when every layer has its own relative-position table."""
  projection = {v: k for k, v in _ACTIVATIONS.items()}.get(tuple(config.mlp_activations))
  if projection is None:
    raise UserError(f'mlp_activations {tuple(config.mlp_activations)} have no transformers '
                    f'equivalent; supported: {sorted(_ACTIVATIONS.values())}')
  per_layer = config.relative_attention_per_layer
  return {
      'architectures': ['UMT5ForConditionalGeneration' if per_layer else
                        'T5ForConditionalGeneration'],
      'model_type': PER_LAYER_RELPOS_MODEL_TYPE if per_layer else 't5',
      'vocab_size': config.vocab_size, 'd_model': config.emb_dim, 'd_kv': config.head_dim,
      'd_ff': config.mlp_dim, 'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers, 'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate, 'layer_norm_epsilon': config.layer_norm_epsilon,
      'initializer_factor': 1.0, 'feed_forward_proj': projection,
      # Both conventions (see scales_decoder_outputs): transformers 4 reads the first, 5
      # the second. An untied model's file holds lm_head.weight, so transformers 5 unties it.
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'scale_decoder_outputs': bool(config.logits_via_embedding),
      'is_encoder_decoder': True, 'use_cache': True, 'pad_token_id': 0, 'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }
