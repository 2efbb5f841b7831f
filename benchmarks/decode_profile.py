"""Where a decode's time goes: per-op thread time from a ``jax.profiler`` trace, by model op.

    python -m benchmarks.decode_profile --profile_batch_size=32 --profile_method=beam4

Decodes random inputs as ``make bench``'s decode rows do (T5 1.1 or, with
``--profile_model=decoder_only``, a prefix LM; float32, input length 128, 32 new tokens, an EOS
id that is never produced), traces one warm decode, and sums the
trace's XLA op events by the model operation each HLO op came from (its ``op_name``, layer
numbers folded), split into work done once per decode and work inside the decoding loop.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
import types
from typing import Any

from absl import app, flags

# Named apart from benchmarks.bench's flags, which this module imports.
_SIZE = flags.DEFINE_string('profile_size', 'small', 'Size (gin/models/<family>/<size>.gin).')
_FAMILY = flags.DEFINE_enum('profile_model', 't5', ['t5', 'decoder_only'],
                            "T5 1.1, or a decoder-only prefix LM (the input is the prompt).")
_BATCH = flags.DEFINE_integer('profile_batch_size', 32, 'Examples per decode.')
_METHOD = flags.DEFINE_string('profile_method', 'greedy', 'greedy or beam<N>.')
_TOP = flags.DEFINE_integer('top', 25, 'Rows of the table.')

INPUT_LENGTH, TARGET_LENGTH = 128, 32


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the model operation it came from, layer numbers folded."""
  names = {}
  for match in re.finditer(r'%([\w.\-]+) = \S+ [^\n]*?op_name="([^"]+)"', hlo_text):
    names[match.group(1)] = re.sub(r'layers_\d+', 'layers_N', match.group(2).split(')/', 1)[-1])
  return names


def _model_and_inputs(bench: Any, family: str, size: str, batch: int
                      ) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, Any]]:
  """The model the bench's decode rows build, its initialisation shapes and random inputs."""
  import numpy as np

  from benchmarks import model_sizes
  from t5train import decoder_only_network, models, network
  decode_fn = bench._decode_fn(_METHOD.value)  # pylint: disable=protected-access
  never = types.SimpleNamespace(eos_id=-1)
  if family == 't5':
    config = bench._t5_config(size, 'float32')  # pylint: disable=protected-access
    model = models.EncoderDecoderModel(network.Transformer(config), None, never, None,
                                       decode_fn=decode_fn)
    inputs = np.random.default_rng(0).integers(2, config.vocab_size, (batch, INPUT_LENGTH))
    shapes = {'encoder_input_tokens': (batch, INPUT_LENGTH),
              'decoder_input_tokens': (batch, TARGET_LENGTH),
              'decoder_target_tokens': (batch, TARGET_LENGTH)}
    return model, shapes, {'encoder_input_tokens': inputs}
  config = network.T5Config(**model_sizes.model_size('decoder_only', size), dtype='float32',
                            dropout_rate=0.0)
  model = models.DecoderOnlyModel(decoder_only_network.DecoderOnlyTransformer(config), never, None,
                                  decode_fn=decode_fn, inputs_bidirectional_attention=True)
  host = bench._prefix_lm_batch(config.vocab_size, batch, INPUT_LENGTH, TARGET_LENGTH)  # pylint: disable=protected-access
  shapes = {name: value.shape for name, value in host.items()}
  return model, shapes, {name: host[name]
                         for name in ('decoder_input_tokens', 'decoder_causal_attention')}


def main(argv: list[str]) -> None:
  del argv
  import flax.linen as nn
  import jax
  import numpy as np

  from benchmarks import bench
  model, shapes, inputs = _model_and_inputs(bench, _FAMILY.value, _SIZE.value, _BATCH.value)
  batch = _BATCH.value
  params = nn.unbox(jax.jit(lambda rng: model.get_initial_variables(rng, shapes)['params'])(
      jax.random.PRNGKey(0)))
  inputs = {name: np.asarray(value, np.int32) for name, value in inputs.items()}
  predict = jax.jit(lambda p, x: model.predict_batch(p, x, max_decode_length=TARGET_LENGTH))
  jax.block_until_ready(predict(params, inputs))
  trace_dir = tempfile.mkdtemp(prefix='decode_profile_')
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  jax.block_until_ready(predict(params, inputs))
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  op_events = [e for e in events if e.get('ph') == 'X' and not e['name'].startswith('$')
               and 'ThunkExecutor' not in e['name'] and 'SlinkyThreadPool' not in e['name']]
  calls = collections.Counter(e['name'] for e in op_events)
  names = _op_names(predict.lower(params, inputs).compile().as_text())
  table: collections.Counter = collections.Counter()
  for event in op_events:
    where = 'loop' if calls[event['name']] >= TARGET_LENGTH else 'once'
    table[(where, names.get(event['name'], event['name']))] += event['dur'] / 1e6
  total = sum(table.values())
  once, loop = (sum(v for (w, _), v in table.items() if w == where) for where in ('once', 'loop'))
  print(f'{_FAMILY.value} {_SIZE.value} {_METHOD.value} batch {batch}: {wall:.2f} s wall, '
        f'{total:.2f} s of op thread time (once {once:.2f} s, loop {loop:.2f} s)')
  for (where, name), secs in table.most_common(_TOP.value):
    print(f'{secs:7.3f} s {100 * secs / total:5.1f}%  {where:<4}  {name}')


if __name__ == '__main__':
  app.run(main)
