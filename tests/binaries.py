"""Helpers for tests that run t5train's binaries in a subprocess and read what they wrote."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import process_forks
from flax import traverse_util

from t5train import checkpoint_reading
from t5train.summaries import read_scalars, read_texts  # noqa: F401  (the tests read summaries)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ['--gin_file=gin/models/t5_1_1/tiny.gin', '--gin_file=gin/runs/pretrain.gin',
         '--gin_file=gin/tasks/demo.gin']


_LAUNCHER = process_forks.Launcher()


def run_binary(module, *args, cwd=REPO, env=None):
  """``python -m MODULE ARGS`` on the CPU; returns the CompletedProcess. The process is a fork
  of one that has the libraries imported already (tests/process_forks.py)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return _LAUNCHER.run(module, args, cwd=cwd, env=env, timeout=600)


def call_configured(configured, gin_files, bindings=()):
  """What a binary does after its start-up, in this process: parse gin as the binaries do (files,
  then ``NAME = VALUE`` bindings), then call ``configured`` (e.g. ``t5train.infer.infer``) with
  what gin binds to it. Saves a process start-up where a test needs no exit status."""
  import gin  # noqa: PLC0415
  from t5train import gin_utils  # noqa: PLC0415
  gin.clear_config()
  try:
    gin_utils.parse_gin([str(f) for f in gin_files], list(bindings),
                        search_paths=[gin_utils.REPO_ROOT])
    return gin.get_configurable(configured)()
  finally:
    gin.clear_config()


def run_train(*args, cwd=REPO, env=None):
  """``python -m t5train.train ARGS`` on the CPU; returns the CompletedProcess."""
  return run_binary('t5train.train', *args, cwd=cwd, env=env)


def read_params(checkpoint_dir):
  """The parameters saved in ``checkpoint_dir`` (a checkpoint_<step> folder) as numpy arrays."""
  item_dir = os.path.join(os.path.abspath(checkpoint_dir), 'state')
  params = {'params': checkpoint_reading.saved_tree(item_dir)['params']}
  as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
  with ocp.PyTreeCheckpointer() as checkpointer:
    state = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=params, restore_args=as_numpy, partial_restore=True))
  return {name: np.asarray(value)
          for name, value in traverse_util.flatten_dict(state['params'], sep='/').items()}
