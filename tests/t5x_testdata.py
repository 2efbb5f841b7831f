"""The real T5X test checkpoint (../shared/testdata/t5x_tiny_v1_1, written by T5X itself; see its
README), and T5X checkpoints the tests write in T5X's layouts from its parameters."""

import os

import numpy as np
from etils import epath

from t5train import hf_interop, t5x_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5X_DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'testdata', 't5x_tiny_v1_1'))
# T5X model directories (each holds checkpoint_2), in T5X's native and Orbax formats.
T5X_MODEL_DIRS = {'native': os.path.join(T5X_DATA, 't5x_checkpoint'),
                  'orbax': os.path.join(T5X_DATA, 't5x_orbax_checkpoint')}


def reference():
  """T5X's fixed batch and the logits it computes for it (compare where decoder_loss_weights > 0)."""
  with np.load(os.path.join(T5X_DATA, 'reference_logits.npz')) as arrays:
    return {name: arrays[name] for name in arrays.files}


def save_as_t5x(directory, flat, step):
  """``flat`` parameters saved as T5X saves a checkpoint in its Orbax format."""
  import orbax.checkpoint as ocp
  epath.Path(directory).mkdir(parents=True)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    checkpointer.save(epath.Path(directory) / 'state', args=ocp.args.PyTreeSave(
        {'target': hf_interop.nest(flat), 'state': {'step': np.array(step, np.int32)}}))
  return str(directory)


def scanned_t5x_checkpoint(directory, per_layer_relpos):
  """The T5X test checkpoint re-saved as T5X's scanned models save theirs (Orbax format): each
  stack's layers stacked on axis 1 under '<stack>/layers/', and with ``per_layer_relpos`` the
  stack's relative-position table copied into every layer as 'relative_posemb'."""
  flat = t5x_checkpoint.read_t5x_params(os.path.join(T5X_MODEL_DIRS['native'], 'checkpoint_2'))
  for stack in ('encoder', 'decoder'):
    names = sorted({k.split('/', 2)[2] for k in flat if k.startswith(f'{stack}/layers_0/')})
    for rest in names:
      flat[f'{stack}/layers/{rest}'] = np.stack(
          [flat.pop(f'{stack}/layers_{i}/{rest}') for i in range(2)], axis=1)
    if per_layer_relpos:
      table = flat.pop(f'{stack}/relpos_bias/rel_embedding')
      flat[f'{stack}/layers/relative_posemb/rel_embedding'] = np.stack([table] * 2, axis=1)
  return save_as_t5x(directory, flat, step=2)
