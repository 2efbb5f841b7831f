"""The benchmark's model sizes, FLOP count and rows."""

import json
import os
import subprocess
import sys

import pytest
import seqio
from binaries import run_binary

import gin
from benchmarks import bench, model_sizes
from t5train import gin_utils, network


@pytest.mark.parametrize('size', ['tiny', 'small', 'xxl'])
def test_bench_sizes_are_what_gin_configures(size):
  """The benchmark reads the gin files without running them; gin itself, running them, must build
  the same T5Config, apart from what the benchmark sets itself (dtype; dropout, a macro)."""
  gin.clear_config()
  gin_utils.parse_gin([f'gin/models/t5_1_1/{size}.gin'], [])
  configured = gin.get_configurable(network.T5Config)()
  gin.clear_config()
  read = network.T5Config(**model_sizes.t5_1_1_size(size), dtype=configured.dtype,
                          dropout_rate=configured.dropout_rate)
  assert read == configured
  assert 'base_architecture' not in model_sizes.known_sizes()


def test_small_step_flops():
  # T5 1.1 small, batch 8, lengths 128/32: about 201 GFLOP per training step. The tolerance is
  # that of a hand count (0.2%), not of float rounding.
  flops = bench.train_flops_per_step(model_sizes.t5_1_1_size('small'), 8, 128, 32)
  assert flops == pytest.approx(200.7e9, rel=2e-3)


def test_decoder_only_step_flops():
  # gin/models/decoder_only/small.gin, batch 8, rows of 128 + 32 tokens: 8 layers of
  # (4 x 512 x 384 + 3 x 512 x 1024) plus 512 x 32128 logits per token, and attention.
  flops = bench.decoder_only_train_flops_per_step(model_sizes.model_size('decoder_only', 'small'),
                                                  8, 160)
  assert flops == pytest.approx(278.8e9, rel=2e-3)


def test_decoder_only_and_finetune_rows_are_measured(tmp_path):
  out = tmp_path / 'bench.json'
  result = run_binary(
      'benchmarks.bench', '--workloads=decoder_only,finetune',
       '--decoder_only_sizes=tiny', '--finetune_sizes=tiny', '--finetune_methods=lora,prompt',
       '--steps=1', '--train_rounds=1', '--peer=none', f'--out={out}', '--lengths=16,8')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report['decoder_only_rows']
  assert 'error' not in row, row
  assert row['system'] == 't5train decoder-only (JAX)'
  assert row['tokens_per_sec'] == pytest.approx(8 * 24 / row['sec_per_step_median'])
  lora, prompt = report['finetune_rows']
  assert 'error' not in lora and 'error' not in prompt, (lora, prompt)
  # LoRA keeps AdamW's two moments (and two step counts) for the adapters only: rank 8 beside
  # the query and value kernels (8 wide, 12 inner) of 2 encoder and 2 x 2 decoder attentions.
  adapter_floats = 6 * 2 * 8 * (8 + 12)
  assert lora['optimizer_state_floats'] == 2 * adapter_floats + 2
  assert prompt['method'] == 'prompt' and prompt['optimizer_state_floats'] < 100 * 8 + 10


def test_decode_rows_are_measured(tmp_path):
  out = tmp_path / 'bench.json'
  result = run_binary(
      'benchmarks.bench', '--workloads=decode', '--decode_sizes=tiny',
      '--decode_decoder_only_sizes=tiny', '--decode_batch_sizes=2',
      '--decode_methods=greedy,beam2', '--decode_repeats=1', '--peer=none', f'--out={out}',
      '--lengths=16,8')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['decode_rows']
  assert [(r['size'], r['method'], r['batch']) for r in rows] == [
      ('tiny', 'greedy', 2), ('tiny', 'beam2', 2), ('tiny (decoder-only)', 'greedy', 2),
      ('tiny (decoder-only)', 'beam2', 2)]
  for row in rows:
    assert 'error' not in row, row
    # Here and below, pytest.approx (1e-6): the bench's float64 arithmetic on the same numbers,
    # possibly grouped otherwise.
    assert row['tokens_per_sec'] == pytest.approx(2 * 8 / row['sec_per_decode_median'])
    assert row['mfu'] == pytest.approx(row['achieved_tflops'] / row['peak_tflops_measured'])
    assert row['achieved_tflops'] == pytest.approx(
        row['model_tflops_per_decode'] / row['sec_per_decode_median'])


def test_decoder_only_decode_flops():
  # gin/models/decoder_only/tiny.gin: 2 layers of (4 x 8 x 12 + 3 x 8 x 16) matmul weights,
  # 8 x 32,128 logits; 16 prompt tokens, then 8 new tokens for each of 2 beams, batch 2.
  size = model_sizes.model_size('decoder_only', 'tiny')
  layers = 2 * (4 * 8 * 12 + 3 * 8 * 16)
  expected = 2 * 2 * (layers * 16 + (layers + 8 * 32128) * 2 * 8)
  assert bench.decoder_only_decode_flops(size, 2, 16, 8, 2) == expected


def test_checkpoint_rows_are_measured(tmp_path):
  out = tmp_path / 'bench.json'
  result = run_binary(
      'benchmarks.bench', '--workloads=checkpoint', '--checkpoint_sizes=tiny',
       '--steps=2', f'--out={out}', '--lengths=16,8')
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = json.loads(out.read_text())['checkpoint_rows']
  assert 'error' not in row, row
  assert row['checkpoint_mb'] > 1  # tiny's 32,128 x 8 embedding and logits alone are 2 MB
  assert row['save_mb_per_sec'] == pytest.approx(row['checkpoint_mb'] / row['save_secs'])
  assert 0 < row['async_blocking_secs'] <= row['async_total_secs']


def test_train_rows_take_turns_with_the_peer_and_print_every_column(tmp_path):
  out = tmp_path / 'bench.json'
  result = run_binary(
      'benchmarks.bench', '--workloads=train', '--sizes=tiny', '--steps=1',
       '--train_rounds=1', '--peer=transformers', f'--out={out}', '--lengths=16,8')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [r['system'] for r in rows] == ['t5train (JAX)', 't5train (notebook API)',
                                         'transformers (PyTorch eager)']
  for row in rows:
    assert 'error' not in row, row
    assert row['tokens_per_sec'] == pytest.approx(8 * (16 + 8) / row['sec_per_step_median'])
    assert 0 < row['mfu'] and row['peak_memory_gib'] > 0
  for binary, notebook, peer in [rows]:
    for ours in (binary, notebook):
      assert ours['speedup_vs_peer'] == pytest.approx(ours['tokens_per_sec'] /
                                                      peer['tokens_per_sec'])
      assert ours['memory_vs_peer'] == pytest.approx(ours['peak_memory_gib'] /
                                                     peer['peak_memory_gib'])
    # The training loop's own account of a step: all compute, some checkpointing, little data.
    assert binary['loop_compute_secs_per_step'] > 0
    assert binary['loop_checkpoint_secs_per_step'] > 0
    assert binary['loop_data_secs_per_step'] >= 0
  header = next(line for line in result.stdout.splitlines() if line.startswith('system'))
  for column in ('s/step', 'spread', 'tokens/s', 'compile+1st', 'TFLOP/s', 'MFU', 'peak mem',
                 'vs peer', 'mem/peer', 'loop data/compute/ckpt s'):
    assert column in header


def test_pipeline_rows_are_measured(tmp_path):
  """The input-pipeline rows of benchmarks/bench_data.py, on a small text file: every row is a
  batch of packed span-corruption examples, each holding at least one, and each stage of the
  pipeline costs more than the stages before it. (In its own process: bench and bench_data both
  define --lengths.)"""
  corpus = tmp_path / 'train.txt'
  corpus.write_text(''.join(f'Sentence number {i} says something about item {i % 17}.\n'
                            for i in range(400)))
  spm = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                     'sentencepiece.model')
  files = {'train': str(corpus), 'spm': spm}
  code = ('import json; from benchmarks import bench_data; print(json.dumps(['
          f'bench_data.measure_pipeline({files!r}, [64, 16], batch=4, num_batches=3), '
          f'bench_data.measure_stages({files!r}, [64, 16], secs=0.3)]))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300, cwd=model_sizes.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  row, stages = json.loads(result.stdout.strip().splitlines()[-1])
  assert row['rows_per_sec'] == pytest.approx(4 * 3 / row['secs'])
  assert row['examples_per_sec'] >= row['rows_per_sec'] > 0
  assert 0 < row['input_tokens_per_sec'] <= 64 * row['rows_per_sec']
  assert row['cpu_us_per_example'] > 0 and row['cores_busy'] > 0
  # Groups of 128 lines (documents) concatenated, then cut into segments of 70 tokens.
  vocabulary = seqio.SentencePieceVocabulary(spm)
  tokens = [len(vocabulary.encode(line)) for line in corpus.read_text().splitlines()]
  segments = sum(-(-sum(tokens[i:i + 128]) // 70) for i in range(0, len(tokens), 128))
  assert stages['lines_per_example'] == pytest.approx(len(tokens) / segments)
  costs = [stage['cpu_us_per_example'] for stage in stages['stages']]
  assert len(costs) == 4 and 0 < costs[0] < costs[1] < costs[3]
