"""Inference over real text of skewed lengths, with and without input length buckets.

    python -m benchmarks.infer_buckets --json_out=docs/bench/cpu_infer_buckets.json

The examples are the validation paragraphs of the text demo's corpus (Python's own
documentation, ``scripts/python_text_corpus.py``) as UTF-8 bytes (seqio's byte vocabulary),
padded to 512 input positions: most paragraphs are far shorter. T5 1.1 small with random
weights decodes 32 tokens for each (an EOS id that is never produced) through
``inference.InferenceRunner``, padded and bucketed in turns (A B A B) in one process.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import types
from typing import Any

from absl import app, flags

_EXAMPLES = flags.DEFINE_integer('examples', 256, 'Paragraphs to decode.')
# Named apart from benchmarks.bench's flags, which this module imports.
_BATCH = flags.DEFINE_integer('inference_batch_size', 32, 'Inference batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Timed passes of each kind, alternated.')
_OUT = flags.DEFINE_string('json_out', 'docs/bench/cpu_infer_buckets.json', 'JSON results.')

INPUT_LENGTH, TARGET_LENGTH = 512, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paragraphs(count: int) -> list[str]:
  sys.path.insert(0, os.path.join(REPO, 'scripts'))
  import python_text_corpus  # noqa: PLC0415
  return [d for d in python_text_corpus.documents() if python_text_corpus.is_validation(d)][:count]


def main(argv: list[str]) -> None:
  del argv
  import flax.linen as nn
  import jax
  import numpy as np
  import seqio

  from benchmarks import bench
  from t5train import inference, models, network, partitioning
  vocabulary = seqio.ByteVocabulary()
  texts = _paragraphs(_EXAMPLES.value)
  model = models.EncoderDecoderModel(
      network.Transformer(bench._t5_config('small', 'float32')), None,  # pylint: disable=protected-access
      types.SimpleNamespace(eos_id=-1), None)
  lengths = {'inputs': INPUT_LENGTH, 'targets': TARGET_LENGTH}
  features = [model.example_features(
      {'inputs': np.asarray(vocabulary.encode(text)[:INPUT_LENGTH - 1] + [1], np.int32)}, lengths)
              for text in texts]
  real = [inference.input_length(f) for f in features]
  shapes = model.input_shapes(_BATCH.value, lengths)
  params = nn.unbox(jax.jit(lambda rng: model.get_initial_variables(rng, shapes)['params'])(
      jax.random.PRNGKey(0)))
  partitioner = partitioning.PjitPartitioner()
  shardings = jax.tree.map(lambda _: partitioner.sharding(jax.sharding.PartitionSpec()), params)
  runners = {bucketed: inference.InferenceRunner(model, partitioner, shardings, _BATCH.value,
                                                 TARGET_LENGTH, bucket_inputs=bucketed)
             for bucketed in (False, True)}
  first: dict[bool, float] = {}
  secs: dict[bool, list[float]] = {False: [], True: []}
  outputs = {}
  for round_index in range(_ROUNDS.value + 1):  # the first round compiles
    for bucketed, runner in runners.items():
      start = time.perf_counter()
      outputs[bucketed] = runner.predict(params, features)[0]
      elapsed = time.perf_counter() - start
      if round_index == 0:
        first[bucketed] = elapsed
      else:
        secs[bucketed].append(elapsed)
  same = all(np.array_equal(a, b) for a, b in zip(outputs[False], outputs[True]))
  rows: list[dict[str, Any]] = []
  for bucketed in (False, True):
    median = statistics.median(secs[bucketed])
    rows.append({'inputs': 'length buckets' if bucketed else 'padded to 512',
                 'secs_median': median, 'examples_per_sec': len(features) / median,
                 'compile_and_first_pass_secs': first[bucketed]})
  rows[1]['speedup'] = rows[0]['secs_median'] / rows[1]['secs_median']
  result = {'machine': bench._machine(), 'examples': len(features),  # pylint: disable=protected-access
            'batch_size': _BATCH.value, 'real_input_tokens_mean': statistics.mean(real),
            'real_input_tokens_median': statistics.median(real),
            'real_input_share_of_padded': sum(real) / (INPUT_LENGTH * len(real)),
            'same_predictions': same, 'rows': rows}
  for row in rows:
    print(f"{row['inputs']:<16} {row['secs_median']:8.2f} s  {row['examples_per_sec']:7.1f} "
          f"examples/s  compile + 1st {row['compile_and_first_pass_secs']:.1f} s "
          f"{row.get('speedup', 0):.2f}x")
  print(json.dumps({k: v for k, v in result.items() if k != 'rows'}))
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
