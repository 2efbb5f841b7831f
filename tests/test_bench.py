"""The benchmark's model sizes and FLOP count."""

import json
import os
import subprocess
import sys

import pytest

from t5train import bench, gin_utils, network


@pytest.mark.parametrize('size', sorted(bench.SIZES))
def test_bench_sizes_match_the_gin_files(size):
  gin_text = open(os.path.join(gin_utils.REPO_ROOT, 'gin', 'models', 't5_1_1', f'{size}.gin')).read()
  for field, value in bench.SIZES[size].items():
    assert f'{field} = {value}' in gin_text, (size, field)
  network.T5Config(**bench.SIZES[size])  # every field is a T5Config field


def test_small_step_flops():
  # T5 1.1 small, batch 8, lengths 128/32: about 201 GFLOP per training step. The tolerance is
  # that of a hand count (0.2%), not of float rounding.
  flops = bench.train_flops_per_step(bench.SIZES['small'], 8, 128, 32)
  assert flops == pytest.approx(200.7e9, rel=2e-3)


def test_decode_rows_are_measured(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 't5train.bench', '--workloads=decode', '--decode_sizes=tiny',
       '--decode_batch_sizes=2', '--decode_methods=greedy,beam2', '--decode_repeats=1',
       '--peer=none', f'--out={out}', '--lengths=16,8'],
      capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['decode_rows']
  assert [(r['method'], r['batch']) for r in rows] == [('greedy', 2), ('beam2', 2)]
  for row in rows:
    assert 'error' not in row, row
    # Here and below, pytest.approx (1e-6): the bench's float64 arithmetic on the same numbers,
    # possibly grouped otherwise.
    assert row['tokens_per_sec'] == pytest.approx(2 * 8 / row['sec_per_decode_median'])
    assert row['sec_per_decode_median'] > 0


def test_checkpoint_rows_are_measured(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 't5train.bench', '--workloads=checkpoint', '--checkpoint_sizes=tiny',
       '--steps=2', f'--out={out}', '--lengths=16,8'],
      capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = json.loads(out.read_text())['checkpoint_rows']
  assert 'error' not in row, row
  assert row['checkpoint_mb'] > 1  # tiny's 32,128 x 8 embedding and logits alone are 2 MB
  assert row['save_mb_per_sec'] == pytest.approx(row['checkpoint_mb'] / row['save_secs'])
  assert 0 < row['async_blocking_secs'] <= row['async_total_secs']


def test_train_rows_alternate_with_the_peer_and_print_every_column(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 't5train.bench', '--workloads=train', '--sizes=tiny', '--steps=1',
       '--train_rounds=2', '--peer=transformers', f'--out={out}', '--lengths=16,8'],
      capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [r['system'].split()[0] for r in rows] == ['t5train', 'transformers'] * 2
  for row in rows:
    assert 'error' not in row, row
    assert row['tokens_per_sec'] == pytest.approx(8 * (16 + 8) / row['sec_per_step_median'])
    assert 0 < row['mfu'] and row['peak_memory_gib'] > 0
  for ours, peer in (rows[0:2], rows[2:4]):
    assert ours['speedup_vs_peer'] == pytest.approx(ours['tokens_per_sec'] / peer['tokens_per_sec'])
    # The training loop's own account of a step: all compute, some checkpointing, little data.
    assert ours['loop_compute_secs_per_step'] > 0 and ours['loop_checkpoint_secs_per_step'] > 0
    assert ours['loop_data_secs_per_step'] >= 0
  header = next(line for line in result.stdout.splitlines() if line.startswith('system'))
  for column in ('s/step', 'spread', 'tokens/s', 'compile+1st', 'TFLOP/s', 'MFU', 'peak mem',
                 'vs peer', 'loop data/compute/ckpt s'):
    assert column in header
