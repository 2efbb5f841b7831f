"""The host allocator settings: the CPU check, the huge-page tunable, the binaries' restart."""

import os
import subprocess
import sys

import pytest

from binaries import REPO, SMOKE
from t5train import host_memory

TUNABLES = 'GLIBC_TUNABLES'
needs_huge_pages = pytest.mark.skipif(
    host_memory.environment_with_huge_pages({}) is None,
    reason='needs glibc and transparent huge pages on request (madvise or always)')


def _without_tunables():
  return {name: value for name, value in os.environ.items() if name != TUNABLES}


def test_jax_platforms_decides_whether_jax_runs_on_cpu():
  assert host_memory.jax_will_run_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not host_memory.jax_will_run_on_cpu({'JAX_PLATFORMS': 'cuda,cpu'})
  assert not host_memory.jax_will_run_on_cpu({'JAX_PLATFORMS': 'tpu'})


@needs_huge_pages
def test_the_tunable_is_added_to_others_and_a_users_choice_is_kept():
  environ = host_memory.environment_with_huge_pages({TUNABLES: 'glibc.malloc.arena_max=2'})
  assert environ[TUNABLES] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert host_memory.environment_with_huge_pages({}) == {TUNABLES: 'glibc.malloc.hugetlb=1'}
  assert host_memory.environment_with_huge_pages({TUNABLES: 'glibc.malloc.hugetlb=0'}) is None


SCRIPT = """
import os, sys
from t5train import host_memory
print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
host_memory.restart_with_huge_pages()
print('after', flush=True)
"""


@needs_huge_pages
def test_restart_execs_the_same_process_once_with_the_tunable():
  environ = {**_without_tunables(), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', SCRIPT, 'an-argument'], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
  first, second, after = result.stdout.splitlines()
  assert first.split(' ', 1)[1] == "None ['an-argument']"
  assert second == f"{first.split()[0]} glibc.malloc.hugetlb=1 ['an-argument']"  # same pid
  assert after == 'after'


def test_no_restart_when_jax_runs_on_an_accelerator():
  environ = {**_without_tunables(), 'JAX_PLATFORMS': 'cuda'}
  result = subprocess.run([sys.executable, '-c', SCRIPT], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
  assert len(result.stdout.splitlines()) == 2  # the first line and 'after': no restart


@needs_huge_pages
def test_the_binaries_restart_with_huge_pages_on_cpu(tmp_path):
  environ = {**_without_tunables(), 'JAX_PLATFORMS': 'cpu'}  # started without the tunable
  result = subprocess.run(
      [sys.executable, '-m', 't5train.train', *SMOKE, f"--gin.MODEL_DIR='{tmp_path}'",
       '--gin.TRAIN_STEPS=-1'], env=environ, cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]  # TRAIN_STEPS must be >= 0
  assert 'Large host memory blocks use transparent huge pages' in result.stderr
