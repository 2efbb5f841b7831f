"""Writes reference.npz: T5X's own decoder-only network, its parameters and its logits.

Run once, with a T5X source checkout (https://github.com/google-research/t5x):

    python tests/testdata/t5x_decoder_only/make_reference.py --t5x_dir=/path/to/t5x

Only ``t5x/examples/decoder_only/{layers,network}.py`` are imported (they need
flax, jax and numpy, nothing else of T5X), so this runs in t5train's own
environment. Two models with odd shapes (model width 20, 3 heads of 7) are
initialised by T5X's own initialisers and applied to fixed packed batches:
``causal`` (tied logits, ReLU MLP, causal attention) and ``prefix`` (untied
logits, gated GELU, T5X's bidirectional attention over the inputs region). The
npz holds, per model, the parameters under their T5X paths, the batch and the
float32 logits.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

OUTPUT = pathlib.Path(__file__).resolve().parent / 'reference.npz'

# T5X TransformerConfig fields of the two models (T5X fixes 32 buckets and distance 128).
CONFIGS = {
    'causal': dict(vocab_size=50, emb_dim=20, num_heads=3, num_layers=3, head_dim=7, mlp_dim=24,
                   mlp_activations=('relu',), dropout_rate=0.0, logits_via_embedding=True),
    'prefix': dict(vocab_size=50, emb_dim=20, num_heads=3, num_layers=2, head_dim=7, mlp_dim=24,
                   mlp_activations=('gelu', 'linear'), dropout_rate=0.0,
                   logits_via_embedding=False),
}


def _import_network(t5x_dir: pathlib.Path) -> types.ModuleType:
  """T5X's decoder-only network module, without importing the rest of the t5x package."""
  package_dir = t5x_dir / 't5x'
  for name, path in (('t5x', package_dir), ('t5x.examples', package_dir / 'examples'),
                     ('t5x.examples.decoder_only', package_dir / 'examples' / 'decoder_only')):
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
  return importlib.import_module('t5x.examples.decoder_only.network')


def _batches() -> dict[str, dict[str, np.ndarray]]:
  """Packed batches of two rows, length 16: two segments in row 0, padding in row 1."""
  segment_ids = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 11 + [0] * 5], np.int32)
  rng = np.random.default_rng(0)
  targets = np.where(segment_ids > 0, rng.integers(2, 50, segment_ids.shape), 0).astype(np.int32)
  inputs = np.zeros_like(targets)
  for row in range(2):
    for segment in (1, 2):
      where = np.flatnonzero(segment_ids[row] == segment)
      if where.size:
        inputs[row, where] = np.concatenate([[0], targets[row, where[:-1]]])
  positions = np.zeros_like(targets)
  for row in range(2):
    for segment in (1, 2):
      where = np.flatnonzero(segment_ids[row] == segment)
      positions[row, where] = np.arange(where.size)
  # Inputs regions: 3 + 1 positions of segment 1 and 2 + 1 of segment 2 in row 0; 5 + 1 in row 1.
  causal_attention = np.zeros_like(targets)
  causal_attention[0, 0:4] = 1
  causal_attention[0, 6:9] = 1
  causal_attention[1, 0:6] = 1
  common = {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
            'decoder_segment_ids': segment_ids, 'decoder_positions': positions}
  return {'causal': common, 'prefix': {**common, 'decoder_causal_attention': causal_attention}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--t5x_dir', type=pathlib.Path, required=True)
  args = parser.parse_args()
  network = _import_network(args.t5x_dir)
  arrays = {}
  for index, (name, fields) in enumerate(CONFIGS.items()):
    module = network.DecoderWrapper(network.TransformerConfig(dtype=jnp.float32, **fields))
    batch = _batches()[name]
    features = {key: jnp.asarray(value) for key, value in batch.items()}
    variables = module.init(jax.random.PRNGKey(index), features['decoder_input_tokens'],
                            features['decoder_target_tokens'], enable_dropout=False)
    params = variables['params']
    logits = module.apply({'params': params}, enable_dropout=False, **features)
    for path, value in traverse_util.flatten_dict(params, sep='/').items():
      arrays[f'{name}/params/{path}'] = np.asarray(value, np.float32)
    for key, value in batch.items():
      arrays[f'{name}/batch/{key}'] = value
    arrays[f'{name}/logits'] = np.asarray(logits, np.float32)
  np.savez_compressed(OUTPUT, **arrays)
  print(f'wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes, {len(arrays)} arrays)')


if __name__ == '__main__':
  main()
