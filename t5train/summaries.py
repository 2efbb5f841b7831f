"""TensorBoard summaries of a run: the gin config as text (and as settings for the trackers),
and reading back what a run wrote (for the benchmark, plots and tests)."""

from __future__ import annotations

from typing import Any

import gin
from t5train import multihost, paths

GIN_CONFIG_TAG = 'config'  # T5X's tag for the config text in MODEL_DIR/train


def summarize_gin_config(model_dir: str, summary_writer: Any = None, step: int = 0) -> None:
  """Writes the operative gin config to ``model_dir/config.gin`` and, given a metric writer
  (clu's ``MetricWriter`` interface, e.g. ``Trainer.summary_writer``), as a TensorBoard text
  summary tagged ``config`` at ``step``, in gin's Markdown rendering (as T5X's
  ``gin_utils.summarize_gin_config`` writes it), and each binding as an hparam
  (``gin_bindings``), which the run's trackers record as its config or params. Process 0 only.
  """
  if not multihost.is_primary():
    return
  config_str = gin.operative_config_str()
  paths.resolve(model_dir).mkdir(parents=True, exist_ok=True)
  paths.write_text_atomically(paths.join(model_dir, 'config.gin'), config_str)
  if summary_writer is not None:
    summary_writer.write_texts(step, {GIN_CONFIG_TAG: gin.markdown(config_str)})
    if hasattr(summary_writer, 'write_hparams'):
      summary_writer.write_hparams(gin_bindings())
    summary_writer.flush()


def gin_bindings() -> dict[str, str]:
  """``{'scope/configurable.parameter': 'value', ...}``: what the run's calls took from gin (its
  operative config), each value as gin writes it (``@optimizers.Adafactor()``, ``'/tmp/run'``),
  a macro's by its value; and each macro as ``'NAME': value``."""
  operative = gin.config._OPERATIVE_CONFIG  # pylint: disable=protected-access
  macros = {scope: values['value'] for (scope, selector), values in operative.items()
            if selector == _MACRO and 'value' in values}
  bindings = {name: _gin_value(value) for name, value in macros.items()}
  for (scope, selector), values in operative.items():
    if selector == _MACRO:
      continue
    name = f'{scope}/{selector}' if scope else selector
    for parameter, value in values.items():
      if getattr(value, 'scoped_selector', '').endswith('/' + _MACRO):
        value = macros.get(value.scoped_selector.rsplit('/', 1)[0], value)
      bindings[f'{name}.{parameter}'] = _gin_value(value)
  return dict(sorted(bindings.items()))


_MACRO = 'gin.macro'


def _gin_value(value: Any) -> str:
  try:
    return gin.config._format_value(value)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  (any value must give a string)
    return repr(value)


def _accumulators(summary_dir: str) -> Any:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  for path in sorted(epath.Path(summary_dir).glob('events.out.tfevents.*')):
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={'tensors': 0})
    accumulator.Reload()
    yield accumulator


def _read(summary_dir: str, plugin: str, convert: Any) -> dict[str, list[tuple[int, Any]]]:
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  values: dict[str, list[tuple[int, Any]]] = {}
  for accumulator in _accumulators(summary_dir):
    for tag in accumulator.Tags()['tensors']:
      if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != plugin:
        continue
      values.setdefault(tag, []).extend(
          (event.step, convert(tensor_util.make_ndarray(event.tensor_proto)))
          for event in accumulator.Tensors(tag))
  return {tag: sorted(found, key=lambda item: item[0]) for tag, found in values.items()}


def read_scalar_events(summary_dir: str) -> dict[str, list[tuple[int, float, float]]]:
  """tag -> [(step, wall time in seconds since the epoch, value), ...] in step order."""
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  values: dict[str, list[tuple[int, float, float]]] = {}
  for accumulator in _accumulators(summary_dir):
    for tag in accumulator.Tags()['tensors']:
      if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == 'scalars':
        values.setdefault(tag, []).extend(
            (event.step, event.wall_time, float(tensor_util.make_ndarray(event.tensor_proto)))
            for event in accumulator.Tensors(tag))
  return {tag: sorted(found, key=lambda item: (item[0], item[1])) for tag, found in values.items()}


def read_scalars(summary_dir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in step order, from the event files in ``summary_dir``."""
  return _read(summary_dir, 'scalars', float)


def read_texts(summary_dir: str) -> dict[str, list[tuple[int, str]]]:
  """tag -> [(step, text), ...] in step order: the text summaries in ``summary_dir``."""
  return _read(summary_dir, 'text', lambda array: array.item().decode('utf-8'))
