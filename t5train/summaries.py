"""Reading back the scalars a run wrote to TensorBoard (for the benchmark, plots and tests)."""

from __future__ import annotations

import glob
import os

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(summary_dir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in step order, from the event files in ``summary_dir``."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(summary_dir, 'events.out.tfevents.*'))):
    accumulator = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    accumulator.Reload()
    for tag in accumulator.Tags()['tensors']:
      scalars.setdefault(tag, []).extend(
          (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
          for event in accumulator.Tensors(tag))
  return {tag: sorted(values) for tag, values in scalars.items()}
