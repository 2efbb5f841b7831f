"""Where a decode's time goes: per-op thread time from a ``jax.profiler`` trace, by model op.

    python -m benchmarks.decode_profile --profile_batch_size=32 --profile_method=beam4

Decodes random inputs as ``make bench``'s decode rows do (T5 1.1, float32, input length 128,
32 new tokens, an EOS id that is never produced), traces one warm decode, and sums the
trace's XLA op events by the model operation each HLO op came from (its ``op_name``, layer
numbers folded), split into work done once per decode and work inside the decoding loop.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import re
import tempfile
import time
import types

from absl import app, flags

# Named apart from benchmarks.bench's flags, which this module imports.
_SIZE = flags.DEFINE_string('profile_size', 'small', 'T5 1.1 size.')
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


def main(argv: list[str]) -> None:
  del argv
  import flax.linen as nn
  import jax
  import numpy as np

  from benchmarks import bench
  from t5train import decoding, models, network
  beams = 1 if _METHOD.value == 'greedy' else int(_METHOD.value.removeprefix('beam'))
  decode_fn = (functools.partial(decoding.temperature_sample, temperature=0.0) if beams == 1
               else functools.partial(decoding.beam_search, num_decodes=beams, alpha=0.6))
  config = bench._t5_config(_SIZE.value, 'float32')  # pylint: disable=protected-access
  model = models.EncoderDecoderModel(network.Transformer(config), None,
                                     types.SimpleNamespace(eos_id=-1), None, decode_fn=decode_fn)
  batch = _BATCH.value
  shapes = {'encoder_input_tokens': (batch, INPUT_LENGTH),
            'decoder_input_tokens': (batch, TARGET_LENGTH),
            'decoder_target_tokens': (batch, TARGET_LENGTH)}
  params = nn.unbox(jax.jit(lambda rng: model.get_initial_variables(rng, shapes)['params'])(
      jax.random.PRNGKey(0)))
  inputs = np.random.default_rng(0).integers(2, config.vocab_size, (batch, INPUT_LENGTH),
                                             dtype=np.int32)
  predict = jax.jit(lambda p, x: model.predict_batch(p, {'encoder_input_tokens': x},
                                                     max_decode_length=TARGET_LENGTH))
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
  print(f'{_SIZE.value} {_METHOD.value} batch {batch}: {wall:.2f} s wall, {total:.2f} s of op '
        f'thread time (once {sum(v for (w, _), v in table.items() if w == "once"):.2f} s, '
        f'loop {sum(v for (w, _), v in table.items() if w == "loop"):.2f} s)')
  for (where, name), secs in table.most_common(_TOP.value):
    print(f'{secs:7.3f} s {100 * secs / total:5.1f}%  {where:<4}  {name}')


if __name__ == '__main__':
  app.run(main)
