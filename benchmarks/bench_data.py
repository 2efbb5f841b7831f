"""``python -m benchmarks.bench_data`` (``make bench``'s pipeline rows): is data ever what training waits on?

Two measurements on span-corrupted English text (scripts/python_text_corpus.py, with a
vocabulary built from it by ``t5train.vocab``), at T5 1.1 small's shapes (inputs 512,
targets 114, packed):
- the input pipeline alone (read, tokenize, span corruption, pack, batch): examples per second
  after a warm-up, on all cores, and the CPU time each example costs;
- the same pipeline cut after each stage: what each stage costs per example, in CPU time;
- the train binary training T5 1.1 small on that task: the seconds per step it spends waiting
  for data against computing (its ``timing/*`` summaries), and the examples per second the
  train step consumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

_LENGTHS = flags.DEFINE_list('lengths', ['512', '114'], 'Input and target lengths.')
_PIPELINE_BATCH = flags.DEFINE_integer('pipeline_batch_size', 128, 'Batch of the pipeline rows.')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 100, 'Batches timed (after 3).')
_STAGE_SECS = flags.DEFINE_float('stage_secs', 8.0, 'Seconds each pipeline stage is timed.')
_TRAIN_BATCH = flags.DEFINE_integer('train_batch_size', 8, 'Batch of the training row.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 12, 'Steps of the training row.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 8000, 'SentencePiece pieces (sentinels apart).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to build the corpus (default: a temp dir).')
_OUT = flags.DEFINE_string('out', None, 'Also write the rows as JSON here.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*command: str) -> None:
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command[:3])} failed: {result.stderr.strip()[-2000:]}')


def prepare_corpus(workdir: str, vocab_size: int) -> dict[str, str]:
  """The corpus files and the vocabulary's gin file, built under ``workdir`` unless there."""
  corpus, vocab = os.path.join(workdir, 'corpus'), os.path.join(workdir, 'spm')
  if not os.path.exists(os.path.join(corpus, 'train.txt')):
    _run(sys.executable, os.path.join(REPO, 'scripts', 'python_text_corpus.py'),
         f'--output={corpus}')
  if not os.path.exists(os.path.join(vocab, 'vocab.gin')):
    _run(sys.executable, '-m', 't5train.vocab', f'--input={corpus}/train.txt',
         f'--vocab_size={vocab_size}', f'--output={vocab}')
  return {'train': os.path.join(corpus, 'train.txt'), 'vocab_gin': os.path.join(vocab, 'vocab.gin'),
          'spm': os.path.join(vocab, 'spm.model')}


def _span_corruption_task(files: dict[str, str]) -> str:
  import seqio  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)

  from t5train import file_tasks  # pylint: disable=g-import-not-at-top
  vocabulary = seqio.SentencePieceVocabulary(files['spm'], extra_ids=100)
  return file_tasks.span_corruption_task(train_files=files['train'], vocabulary=vocabulary,
                                         name='bench_span_corruption')


def _packed_batches(task: str, lengths: Sequence[int], batch: int) -> Any:
  import seqio  # pylint: disable=g-import-not-at-top

  from t5train import data  # pylint: disable=g-import-not-at-top
  config = data.DatasetConfig(task, {'inputs': lengths[0], 'targets': lengths[1]},
                              batch_size=batch, seed=0, pack=True)
  return data.get_dataset(config, seqio.EncDecFeatureConverter)


def _examples_in(packed_batch: dict[str, Any]) -> int:
  """Packed rows hold several examples: the segments that start in each row."""
  return int(packed_batch['encoder_segment_ids'].numpy().max(axis=1).sum())


def measure_pipeline(files: dict[str, str], lengths: Sequence[int], batch: int,
                     num_batches: int) -> dict[str, Any]:
  """Examples per second of the whole input pipeline, batched and packed as training reads it,
  and the CPU time (all threads of this process) per example."""
  iterator = iter(_packed_batches(_span_corruption_task(files), lengths, batch))
  for _ in range(3):  # fills the shuffle buffer and the prefetch
    next(iterator)
  start, cpu_start, examples, tokens = time.perf_counter(), time.process_time(), 0, 0
  for _ in range(num_batches):
    batch_arrays = next(iterator)
    examples += _examples_in(batch_arrays)
    tokens += int((batch_arrays['encoder_input_tokens'].numpy() > 0).sum())
  secs, cpu_secs = time.perf_counter() - start, time.process_time() - cpu_start
  return {'workload': 'pipeline', 'batch': batch, 'lengths': list(lengths),
          'examples_per_sec': examples / secs, 'rows_per_sec': batch * num_batches / secs,
          'input_tokens_per_sec': tokens / secs, 'cpu_us_per_example': 1e6 * cpu_secs / examples,
          'cores_busy': cpu_secs / secs, 'secs': secs}


def _timed(iterator: Any, count: Any, secs: float) -> tuple[float, float]:
  """(elements per second, CPU microseconds per element) over ``secs`` after one warm-up batch."""
  count(next(iterator))
  start, cpu_start, elements = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - start < secs:
    elements += count(next(iterator))
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  return elements / wall, 1e6 * cpu / elements


def measure_stages(files: dict[str, str], lengths: Sequence[int], secs: float) -> dict[str, Any]:
  """The pipeline cut after each stage and timed alone: CPU time per example up to there.

  Lines are converted to examples by the lines one epoch of the file takes per example.
  """
  import seqio  # pylint: disable=g-import-not-at-top

  from t5train import file_tasks  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(_span_corruption_task(files))
  sequence_length = {'inputs': lengths[0], 'targets': lengths[1]}
  with open(files['train'], 'rb') as f:
    lines = sum(1 for _ in f)
  one_epoch = task.get_dataset(sequence_length, 'train', shuffle=False, seed=0, num_epochs=1)
  lines_per_example = lines / sum(1 for _ in one_epoch.as_numpy_iterator())

  def records() -> Any:
    return task.source.get_dataset('train', shuffle=True, seed=0).repeat()

  tokenized = file_tasks.tokenize_in_batches(records(), task.output_features,
                                             copy_pretokenized=False, unbatch=False)
  examples = task.get_dataset(sequence_length, 'train', shuffle=True, seed=0, num_epochs=None)
  stages = [  # (stage, unit, iterator, elements in one of its elements)
      ('read and parse the files', 'line', iter(records().batch(256)),
       lambda b: int(b['targets'].shape[0])),
      ('+ tokenize (256 lines per call)', 'line', iter(tokenized), lambda b: int(b['targets'].nrows())),
      ('+ span corruption, EOS, shuffle', 'example', iter(examples.ragged_batch(128)),
       lambda b: int(b['targets'].nrows())),
      ('+ pack, feature conversion, batch 128', 'example',
       iter(_packed_batches(task.name, lengths, 128)), _examples_in),
  ]
  rows = []
  for stage, unit, iterator, count in stages:
    per_sec, cpu_us = _timed(iterator, count, secs)
    per_example = lines_per_example if unit == 'line' else 1.0
    rows.append({'stage': stage, 'unit': unit, 'per_sec': per_sec, 'cpu_us_each': cpu_us,
                 'cpu_us_per_example': cpu_us * per_example})
  return {'workload': 'pipeline_stages', 'lengths': list(lengths),
          'lines_per_example': lines_per_example, 'stages': rows}


def measure_training(files: dict[str, str], lengths: Sequence[int], batch: int, steps: int,
                     workdir: str) -> dict[str, Any]:
  """The train binary on the span-corruption task with T5 1.1 small: data wait against compute."""
  from t5train import summaries  # pylint: disable=g-import-not-at-top
  model_dir = os.path.join(workdir, 'model')
  _run(sys.executable, '-m', 't5train.train', '--gin_file=gin/models/t5_1_1/small.gin',
       '--gin_file=gin/runs/pretrain.gin', '--gin_file=gin/tasks/span_corruption.gin',
       f'--gin_file={files["vocab_gin"]}', f'--gin.TRAIN_FILES="{files["train"]}"',
       f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
       f'--gin.BATCH_SIZE={batch}', f'--gin.SUMMARY_PERIOD={steps // 2}',
       f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {lengths[0]}, 'targets': {lengths[1]}}}",
       "--gin.network.T5Config.dtype='float32'", '--gin.CHECKPOINT_PERIOD=100000',
       '--gin.EVAL_PERIOD=0')
  scalars = summaries.read_scalars(os.path.join(model_dir, 'train'))
  # The second window: the first holds the compilation.
  data_secs = scalars['timing/data_secs_per_step'][-1][1]
  compute_secs = scalars['timing/compute_secs_per_step'][-1][1]
  return {'workload': 'train_small_span_corruption', 'batch': batch, 'lengths': list(lengths),
          'data_secs_per_step': data_secs, 'compute_secs_per_step': compute_secs,
          'data_wait_fraction': data_secs / (data_secs + compute_secs),
          'examples_per_sec_consumed': batch / (data_secs + compute_secs)}


def main(argv: Sequence[str]) -> None:
  del argv
  lengths = [int(x) for x in _LENGTHS.value]
  with tempfile.TemporaryDirectory() as scratch:
    workdir = _WORKDIR.value or scratch
    files = prepare_corpus(workdir, _VOCAB_SIZE.value)
    rows = [measure_pipeline(files, lengths, _PIPELINE_BATCH.value, _PIPELINE_BATCHES.value),
            measure_stages(files, lengths, _STAGE_SECS.value),
            measure_training(files, lengths, _TRAIN_BATCH.value, _TRAIN_STEPS.value,
                             tempfile.mkdtemp(dir=workdir))]
  pipeline, stages, train = rows
  step_secs = train['data_secs_per_step'] + train['compute_secs_per_step']
  print(f'pipeline: {pipeline["examples_per_sec"]:,.0f} examples/s '
        f'({pipeline["input_tokens_per_sec"]:,.0f} input tokens/s), batch {pipeline["batch"]}, '
        f'lengths {lengths[0]}/{lengths[1]}, packed; {pipeline["cpu_us_per_example"]:,.0f} us of '
        f'CPU per example, {pipeline["cores_busy"]:.2f} cores busy')
  print(f'each stage alone ({stages["lines_per_example"]:.1f} lines per example):')
  for row in stages['stages']:
    print(f'  {row["stage"]:<40} {row["per_sec"]:>9,.0f} {row["unit"]}s/s '
          f'{row["cpu_us_each"]:>8,.1f} us CPU each, {row["cpu_us_per_example"]:>6,.0f} per example')
  print(f'training T5 1.1 small on it: {train["examples_per_sec_consumed"]:.2f} examples/s '
        f'consumed; waits for data {100 * train["data_wait_fraction"]:.2f}% of each step '
        f'({train["data_secs_per_step"]:.4f} s of {step_secs:.2f} s)')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
