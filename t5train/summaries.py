"""Reading back the scalars a run wrote to TensorBoard (for the benchmark, plots and tests)."""

from __future__ import annotations

from etils import epath
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(summary_dir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in step order, from the event files in ``summary_dir``."""
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(epath.Path(summary_dir).glob('events.out.tfevents.*')):
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={'tensors': 0})
    accumulator.Reload()
    for tag in accumulator.Tags()['tensors']:
      scalars.setdefault(tag, []).extend(
          (event.step, float(tensor_util.make_ndarray(event.tensor_proto)))
          for event in accumulator.Tensors(tag))
  return {tag: sorted(values) for tag, values in scalars.items()}
