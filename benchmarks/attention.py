"""``python -m benchmarks.attention``: one T5 self-attention layer with its relative-position bias,
forward and backward, at several input lengths, through each attention path.

The layer is T5 1.1 base's (12 heads of 64, model width 768) on a fixed number of tokens per
batch (``--tokens``; the batch shrinks as the length grows), rows padded at the end to random
lengths, in bfloat16 with float32 parameters. The step is the gradient of a loss on the layer's
output with respect to the inputs, the projections and the learned bias table. Paths:

- ``einsum``: t5train's own attention on the dense bias [batch, heads, q, k] (the default);
- ``cudnn_dense``: cuDNN's fused attention handed that dense bias (packed batches still are);
- ``cudnn``: cuDNN's fused attention handed ``network.AttentionBias``: the bias
  [1, heads, q, k] and the padding as lengths, so no [batch, heads, q, k] array exists;
- ``xla``: ``jax.nn.dot_product_attention``'s XLA implementation on ``AttentionBias``.

Each row reports the step's median time, the temporary device memory XLA allocates for it
(``memory_analysis``, so rows in one process do not mix), and its errors against the einsum
path at that length (output and the bias table's gradient, relative 2-norm).
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

_LENGTHS = flags.DEFINE_list('lengths', ['512', '2048', '8192'], 'Input lengths.')
_TOKENS = flags.DEFINE_integer('tokens', 32768, 'Tokens per batch (batch = tokens / length).')
_PATHS = flags.DEFINE_list('paths', ['einsum', 'cudnn_dense', 'cudnn'], 'Attention paths.')
_HEADS = flags.DEFINE_integer('heads', 12, 'Attention heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Width of a head.')
_EMBED = flags.DEFINE_integer('embed', 768, 'Model width.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'Activation dtype.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 untimed ones).')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON rows.')

_BUCKETS, _MAX_DISTANCE = 32, 128


def _layer(path: str, heads: int, head_dim: int, dtype: str) -> Any:
  import flax.linen as nn

  from t5train import network

  class SelfAttention(nn.Module):
    """T5's encoder self-attention with its table; bucket ids come in as an argument (a long
    input's ids would otherwise be a constant of hundreds of MB in the program)."""

    @nn.compact
    def __call__(self, x: Any, tokens: Any, buckets: Any) -> Any:
      relpos = network.RelativePositionBiases(_BUCKETS, heads, dtype, name='relpos_bias')(buckets)
      if path in ('cudnn', 'xla'):
        bias = network.AttentionBias.from_tokens(relpos, tokens, tokens)
      else:
        bias = relpos + network.mask_to_bias(network.attention_mask(tokens, tokens), dtype)
      implementation = {'einsum': None, 'cudnn_dense': 'cudnn'}.get(path, path)
      return network.MultiHeadAttention(heads, head_dim, dtype, implementation=implementation,
                                        name='attention')(x, x, bias, deterministic=True)
  return SelfAttention()


@functools.lru_cache(maxsize=1)
def _buckets(length: int) -> Any:
  from t5train import network
  return network.position_buckets(length, length, True, _BUCKETS, _MAX_DISTANCE)


def _inputs(batch: int, length: int, embed: int, seed: int = 0) -> tuple[Any, Any, Any, Any]:
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, length, embed)).astype(np.float32)
  tokens = rng.integers(2, 1000, (batch, length)).astype(np.int32)
  for row in range(1, batch):  # the first row full, the others padded at the end
    tokens[row, rng.integers(length * 7 // 8, length + 1):] = 0
  buckets = _buckets(length)
  weights = (rng.standard_normal((batch, length, embed)) * (tokens > 0)[..., None])
  return (jnp.asarray(x), jnp.asarray(tokens), jnp.asarray(buckets),
          jnp.asarray(weights.astype(np.float32)))


def _step(module: Any) -> Any:
  import jax
  import jax.numpy as jnp

  def loss(params: Any, x: Any, tokens: Any, buckets: Any, weights: Any) -> Any:
    out = module.apply({'params': params}, x, tokens, buckets)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _relative_error(got: Any, want: Any) -> float:
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def measure(length: int, path: str, reference: dict[str, Any] | None) -> dict[str, Any]:
  """One row; ``reference`` (the einsum row's outputs at this length) for the errors."""
  import flax.linen as nn
  import jax
  import numpy as np
  batch = max(_TOKENS.value // length, 1)
  heads, head_dim = _HEADS.value, _HEAD_DIM.value
  x, tokens, buckets, weights = _inputs(batch, length, _EMBED.value)
  module = _layer(path, heads, head_dim, _DTYPE.value)
  params = nn.unbox(_layer('einsum', heads, head_dim, _DTYPE.value).init(
      jax.random.PRNGKey(0), x[:1], tokens[:1], buckets)['params'])
  # A table far from zero (as a trained one is), so that errors in the bias path show.
  params['relpos_bias']['rel_embedding'] = 2.0 * jax.random.normal(
      jax.random.PRNGKey(1), params['relpos_bias']['rel_embedding'].shape)
  step = _step(module)
  start = time.perf_counter()
  compiled = step.lower(params, x, tokens, buckets, weights).compile()
  compile_secs = time.perf_counter() - start
  memory = compiled.memory_analysis()
  (_, out), grads = compiled(params, x, tokens, buckets, weights)
  jax.block_until_ready(out)
  compiled(params, x, tokens, buckets, weights)
  secs = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x, tokens, buckets, weights))
    secs.append(time.perf_counter() - start)
  inner = heads * head_dim
  # Forward: Q, K, V, O projections and the two attention matmuls; backward twice that.
  flops = 3 * (2 * batch * length * _EMBED.value * inner * 4 + 4 * batch * length**2 * inner)
  median = statistics.median(secs)
  real = np.asarray(tokens > 0)[..., None]
  row = {'path': path, 'length': length, 'batch': batch, 'heads': heads, 'head_dim': head_dim,
         'sec_per_step_median': median, 'sec_per_step_min': min(secs),
         'tflops': flops / median / 1e12, 'compile_secs': compile_secs,
         'temp_memory_gib': memory.temp_size_in_bytes / 2**30 if memory else None,
         'device': str(jax.devices()[0].device_kind)}
  result = {'out': np.where(real, np.asarray(out, np.float32), 0.0),
            'table_grad': np.asarray(grads[0]['relpos_bias']['rel_embedding']),
            'x_grad': np.asarray(grads[1])}
  if reference is not None:
    row.update({f'{name}_relative_error': _relative_error(result[name], reference[name])
                for name in result})
  row['result'] = result
  return row


def _format(row: dict[str, Any]) -> str:
  if 'error' in row:
    return f'{row["path"]:<12} {row["length"]:>6}  failed: {row["error"]}'
  errors = ' '.join(f'{row[name]:.1e}' if name in row else '-'
                    for name in ('out_relative_error', 'table_grad_relative_error',
                                 'x_grad_relative_error'))
  return (f'{row["path"]:<12} {row["length"]:>6} {row["batch"]:>5} '
          f'{1e3 * row["sec_per_step_median"]:>9.2f} {row["tflops"]:>8.1f} '
          f'{row["temp_memory_gib"]:>10.2f} {row["compile_secs"]:>8.1f}  {errors}')


def main(argv: Sequence[str]) -> None:
  del argv
  import jax
  print(f'attention: T5 self-attention layer, {_HEADS.value} heads of {_HEAD_DIM.value}, width '
        f'{_EMBED.value}, {_TOKENS.value} tokens per batch, {_DTYPE.value}; forward + backward '
        f'(inputs, projections, bias table); {jax.devices()[0].device_kind}', flush=True)
  print(f'{"path":<12} {"length":>6} {"batch":>5} {"ms/step":>9} {"TFLOP/s":>8} '
        f'{"temp GiB":>10} {"compile":>8}  errors vs einsum (out, table grad, x grad)', flush=True)
  rows = []
  for length in (int(n) for n in _LENGTHS.value):
    reference = None
    for path in _PATHS.value:
      try:
        row = measure(length, path, reference)
      except Exception as e:  # noqa: BLE001 - a path that fails (OOM, unsupported) is a row too
        row = {'path': path, 'length': length, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
      result = row.pop('result', None)
      if path == 'einsum' and result is not None:
        reference = result
      print(_format(row), flush=True)
      rows.append(row)
      if _OUT.value:  # after every row, so that a timeout keeps what was measured
        with open(_OUT.value, 'w') as f:
          json.dump({'tokens_per_batch': _TOKENS.value, 'dtype': _DTYPE.value, 'rows': rows}, f,
                    indent=2)


if __name__ == '__main__':
  app.run(main)
