"""The benchmark's model sizes and FLOP count."""

import os

import pytest

from t5train import bench, gin_utils, network


@pytest.mark.parametrize('size', sorted(bench.SIZES))
def test_bench_sizes_match_the_gin_files(size):
  gin_text = open(os.path.join(gin_utils.REPO_ROOT, 'gin', 'models', 't5_1_1', f'{size}.gin')).read()
  for field, value in bench.SIZES[size].items():
    assert f'{field} = {value}' in gin_text, (size, field)
  network.T5Config(**bench.SIZES[size])  # every field is a T5Config field


def test_small_step_flops():
  # T5 1.1 small, batch 8, lengths 128/32: about 201 GFLOP per training step.
  flops = bench.train_flops_per_step(bench.SIZES['small'], 8, 128, 32)
  assert flops == pytest.approx(200.7e9, rel=2e-3)
