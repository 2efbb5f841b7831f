"""``python -m t5train.plot``: runs side by side as a picture, from their TensorBoard events.

    python -m t5train.plot /runs/lr1 /runs/lr3 gs://bucket/runs/lr10 --output=runs.png

draws the chosen scalars of each run against steps and against wall-clock hours into a PNG:
one row of plots per ``--scalars`` pattern, one column per ``--x`` axis, a colour per run. A
scalar is named by its folder under the run directory and its TensorBoard tag
(``train/loss``, ``training_eval/sort_digits/accuracy``, ``inference_eval/<task>/eval/bleu``), and
a pattern may hold ``*`` (``training_eval/*/loss``: every task's). Runs may be local folders or
``gs://`` URLs. Needs matplotlib: ``pip install 't5train[plot]'``.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from t5train import gin_utils, paths, summaries
from t5train.errors import UserError

_MAX_DEPTH = 3  # folders below the run directory searched for event files
_IGNORED_FOLDERS = ('plugins', 'wandb')  # profiles, and W&B's own run files
X_AXES = ('step', 'time')
Series = list[tuple[int, float, float]]  # (step, wall time, value)


def run_scalars(run_dir: str) -> dict[str, Series]:
  """``{'<folder>/<tag>': [(step, wall time, value), ...]}`` of every event file under
  ``run_dir`` (``train/loss``, ``training_eval/<task>/loss``, ...)."""
  root = paths.resolve(run_dir)
  if not root.exists():
    raise UserError(f'{run_dir} does not exist')
  # A run's folders of events are one or two deep (train/, training_eval/<task>/); epath globs
  # no '**' on buckets.
  folders = sorted({path.parent for depth in range(_MAX_DEPTH + 1)
                    for path in root.glob('*/' * depth + 'events.out.tfevents.*')})
  scalars: dict[str, Series] = {}
  for folder in folders:
    relative = os.path.relpath(os.fspath(folder), os.fspath(root)) if not paths.is_url(
        run_dir) else os.fspath(folder)[len(os.fspath(root)):].strip('/')
    if relative.split('/')[0] in _IGNORED_FOLDERS:
      continue
    prefix = '' if relative in ('', '.') else relative + '/'
    for tag, series in summaries.read_scalar_events(os.fspath(folder)).items():
      scalars[prefix + tag] = series
  if not scalars:
    raise UserError(f'{run_dir} holds no TensorBoard scalars (no events.out.tfevents.* files)')
  return scalars


def run_labels(run_dirs: Sequence[str], labels: Sequence[str] = ()) -> list[str]:
  """The legend's name of each run: ``labels`` if given, else the shortest distinct tails of
  the paths (``lr3``; ``a/lr3`` and ``b/lr3`` where two end alike)."""
  if labels:
    if len(labels) != len(run_dirs):
      raise UserError(f'--labels names {len(labels)} runs, but {len(run_dirs)} are given')
    return list(labels)
  parts = [os.fspath(d).rstrip('/').split('/') for d in run_dirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return [os.fspath(d) for d in run_dirs]


def smooth(values: Sequence[float], weight: float) -> list[float]:
  """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
  if not weight:
    return list(values)
  result, average = [], 0.0
  for count, value in enumerate(values, start=1):
    average = average * weight + (1 - weight) * value
    result.append(average / (1 - weight ** count))
  return result


def _matplotlib() -> Any:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("t5train.plot needs matplotlib, which is not installed: "
                    "pip install 't5train[plot]'") from None
  matplotlib.use('Agg')  # no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_runs(run_dirs: Sequence[str], output: str, scalars: Sequence[str] = ('train/loss',),
              x_axes: Sequence[str] = X_AXES, labels: Sequence[str] = (),
              title: str | None = None, smoothing: float = 0.0) -> tuple[int, int]:
  """Draws ``scalars`` (patterns) of each run against ``x_axes`` into the PNG ``output``;
  returns its (width, height) in pixels."""
  if not run_dirs:
    raise UserError('name at least one run directory: python -m t5train.plot MODEL_DIR ... '
                    '--output=runs.png')
  unknown = [x for x in x_axes if x not in X_AXES]
  if unknown or not x_axes:
    raise UserError(f'--x takes {" and/or ".join(X_AXES)}, not {",".join(x_axes) or "nothing"}')
  if not 0 <= smoothing < 1:
    raise UserError(f'--smoothing must be in [0, 1), not {smoothing}')
  plt = _matplotlib()
  names = run_labels(run_dirs, labels)
  runs = {name: run_scalars(run_dir) for name, run_dir in zip(names, run_dirs)}
  rows = [(pattern, _matches(pattern, runs)) for pattern in scalars]
  missing = [pattern for pattern, matched in rows if not matched]
  if missing:
    available = sorted({key for found in runs.values() for key in found})
    raise UserError(f'no run has a scalar matching {", ".join(missing)}; they have '
                    f'{", ".join(available[:30])}{" ..." if len(available) > 30 else ""}')
  figure, axes = plt.subplots(len(rows), len(x_axes), figsize=(6.5 * len(x_axes), 3.6 * len(rows)),
                              dpi=100, squeeze=False)
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for row, (pattern, matched) in enumerate(rows):
    for column, x_axis in enumerate(x_axes):
      ax = axes[row][column]
      for index, (name, found) in enumerate(runs.items()):
        starts = min(series[0][1] for series in found.values() if series)
        keys = matched.get(name, [])
        for number, key in enumerate(keys):
          steps, times, values = zip(*found[key])
          xs = steps if x_axis == 'step' else [(t - starts) / 3600 for t in times]
          label = name if len(keys) == 1 and '*' not in pattern else f'{name}: {key}'
          ax.plot(xs, smooth(values, smoothing), label=label, color=colours[index % len(colours)],
                  linestyle=('-', '--', ':', '-.')[number % 4], marker='o' if len(xs) < 12 else None,
                  markersize=3)
      ax.set_xlabel('step' if x_axis == 'step' else 'hours since the run began')
      ax.set_title(pattern, fontsize=9)
      ax.set_ylabel(pattern.rsplit('/', 1)[-1], fontsize=8)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  if title:
    figure.suptitle(title, fontsize=11)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png')
  size = tuple(int(v) for v in figure.canvas.get_width_height())
  plt.close(figure)
  if not paths.is_url(output):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  paths.write_bytes_atomically(output, buffer.getvalue())
  return size


def _matches(pattern: str, runs: Mapping[str, Mapping[str, Series]]) -> dict[str, list[str]]:
  """run name -> the run's scalar keys that ``pattern`` matches (runs without one left out)."""
  found = {name: sorted(key for key in scalars if fnmatch.fnmatchcase(key, pattern))
           for name, scalars in runs.items()}
  return {name: keys for name, keys in found.items() if keys}


def _define_flags() -> dict[str, Any]:
  """The binary's flags, defined only when it runs: t5train.convert and t5train.vocab, which a
  process may import beside this module, define an --output of their own."""
  return {
      'output': flags.DEFINE_string('output', None,
                                    'The PNG to write (a local path or a gs:// URL).'),
      'scalars': flags.DEFINE_list(
          'scalars', ['train/cross_ent_per_nonpadding_target_token',
                      'training_eval/*/cross_ent_per_nonpadding_target_token'],
          'Scalars to draw, one row of plots each: <folder under the run directory>/<tag>, with '
          '* matching anything (e.g. train/accuracy, training_eval/*/loss, memory: '
          'train/memory/*).'),
      'x': flags.DEFINE_list('x', ['step', 'time'], 'Horizontal axes, one column each: step, '
                             'time (hours since the run began).'),
      'labels': flags.DEFINE_list('labels', [], 'A name per run for the legend (default: the '
                                  'folder names, with their parents where two are alike).'),
      'title': flags.DEFINE_string('title', None, 'A title above the plots.'),
      'smoothing': flags.DEFINE_float(
          'smoothing', 0.0, 'Exponential moving average weight in [0, 1) (TensorBoard\'s '
          'smoothing); 0 draws the values as written.'),
  }


def main(argv: Sequence[str], options: Mapping[str, Any]) -> None:
  value = {name: holder.value for name, holder in options.items()}
  if not value['output']:
    raise UserError('--output is required: the PNG to write, e.g. --output=runs.png')
  width, height = plot_runs(argv[1:], value['output'], value['scalars'], value['x'],
                            value['labels'], value['title'], value['smoothing'])
  print(f"wrote {value['output']} ({width}x{height})", flush=True)


def console_main() -> None:
  options = _define_flags()
  gin_utils.run(functools.partial(main, options=options), program='t5train.plot')


if __name__ == '__main__':
  console_main()
