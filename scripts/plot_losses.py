"""Draws a run's training and validation loss from its TensorBoard events into a PNG.

    python scripts/plot_losses.py /tmp/t5train_text/model docs/images/demo_text_loss.png

Reads ``MODEL_DIR/train`` (``loss`` per summary window) and every task under
``MODEL_DIR/training_eval`` (the teacher-forced validation ``loss``). Needs matplotlib
(``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use('Agg')  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from t5train import summaries  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('model_dir')
  parser.add_argument('output', help='the PNG to write')
  parser.add_argument('--title', default='span corruption on Python\'s documentation (make demo-text)')
  args = parser.parse_args()
  figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
  train = summaries.read_scalars(os.path.join(args.model_dir, 'train'))['loss']
  axes.plot(*zip(*train), label='training loss (per summary window)')
  eval_root = os.path.join(args.model_dir, 'training_eval')
  for task in sorted(os.listdir(eval_root)) if os.path.isdir(eval_root) else []:
    validation = summaries.read_scalars(os.path.join(eval_root, task)).get('loss')
    if validation:
      axes.plot(*zip(*validation), marker='o', label=f'validation loss ({task})')
  axes.set_xlabel('step')
  axes.set_ylabel('cross entropy per target token')
  axes.set_title(args.title, fontsize=10)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  figure.savefig(args.output)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
