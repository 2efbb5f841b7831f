"""Checks that t5train's imports point down the layers (see docs/architecture.md).

A module may import t5train modules of its own layer or of lower layers only,
and TensorFlow / seqio only where the data layer allows it.
"""

import ast
import pathlib
import sys

LAYERS = {
    'errors': 0, 'host_memory': 0, 'paths': 0, 'quiet_start': 0,
    'network': 1, 'decoder_only_network': 1, 'losses': 1, 'decoding': 1, 'hf_interop': 1,
    'models': 2,
    't5x_checkpoint': 3, 'convert': 5,
    'partitioning': 3, 'optimizers': 3, 'train_state': 3, 'checkpoints': 3, 'checkpoint_reading': 3,
    'legacy_checkpoints': 3, 'data': 3,
    'tasks': 3, 'file_formats': 3, 'file_tasks': 3, 'vocabulary_builder': 3, 'span_corruption': 3,
    'text_metrics': 3, 'settings_check': 3,
    'metrics': 3, 'model_info': 3, 'multihost': 3, 'preemption': 3, 'rng': 3, 'summaries': 3,
    'trainer': 4, 'assembly': 4, 'best_checkpoint': 4, 'inference': 4, 'evaluation': 4, 'testing': 4,
    'batching': 4,
    'train': 5, 'infer': 5, 'eval': 5, 'gin_utils': 5, 'utils': 5, 'adafactor': 5,
    'interactive_model': 5, 'vocab': 5, 'gin_report': 5, 't5x_compat': 5,
    'serving': 5, 'serve': 5,
    # Edges: experiment trackers, the profiler and the plot binary (nothing below imports them).
    'trackers': 5, 'wandb_writer': 5, 'mlflow_writer': 5, 'profiling': 5, 'plot': 5,
    'prediction_summaries': 4,
}
# Others import seqio / tensorflow lazily.
TF_ALLOWED = {'data', 'tasks', 'file_tasks', 'span_corruption', 'interactive_model'}
HEAVY = {'tensorflow', 'seqio'}


def main() -> int:
  root = pathlib.Path(__file__).resolve().parent.parent / 't5train'
  problems = []
  for path in sorted(root.glob('*.py')):
    name = path.stem
    if name == '__init__':
      continue
    if name not in LAYERS:
      problems.append(f'{path.name}: not assigned to a layer in scripts/check_imports.py')
      continue
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module-level imports only; function-level ones are lazy
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        if node.module == 't5train':
          targets = [f't5train.{alias.name}' for alias in node.names]
        else:
          targets = [node.module]
      for target in targets:
        top = target.split('.')[0]
        if top in HEAVY and name not in TF_ALLOWED:
          problems.append(f'{path.name}: imports {target} at module level')
        if top == 't5train':
          imported = target.split('.')[1]
          if LAYERS.get(imported, 99) > LAYERS[name]:
            problems.append(f'{path.name} (layer {LAYERS[name]}) imports {imported} '
                            f'(layer {LAYERS.get(imported)})')
  for problem in problems:
    print(problem)
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
