"""MLflow as a clu ``MetricWriter`` (``METRIC_WRITERS`` with ``'mlflow'``).

Imported by ``trackers`` only when MLflow is asked for, since it imports ``mlflow`` (and clu's
metric writers, which import TensorFlow). It talks to the tracking server through
``MlflowClient`` and never touches MLflow's global active run, so it cannot mix with a user's
own ``mlflow.start_run``. The experiment is the run's group; the run's id is kept in the run
directory's ``trackers.json``, so a resumed job continues the same MLflow run. A local file
store (``MLFLOW_TRACKING_URI=file:/path``) works offline; MLflow 3 asks for
``MLFLOW_ALLOW_FILE_STORE=true`` to use one. Names are TensorBoard's tags with their folder
(``train/loss``); a file store keeps each name as a file path, where ``learning_rate`` could
not be a file and the folder of ``learning_rate/current`` at once, so there ``/`` becomes ``.``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from clu.metric_writers import interface
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.uri import get_uri_scheme

from t5train.errors import UserError

_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
_PARAM_BATCH = 100  # and of params
_PARAM_VALUE_CHARS = 6000  # the longest param value every MLflow store takes


def _is_file_store(tracking_uri: str) -> bool:
  """Whether MLflow keeps runs as files (a ``file:`` URI or a plain local path)."""
  return get_uri_scheme(tracking_uri) in ('', 'file') and tracking_uri != 'databricks'


def _param_value(value: Any) -> str:
  text = str(value)
  return text if len(text) <= _PARAM_VALUE_CHARS else text[:_PARAM_VALUE_CHARS - 3] + '...'


class MlflowWriter(interface.MetricWriter):
  """Scalars as metrics, texts as artifacts (``texts/<tag>/step_<step>.md``), hparams as params
  of one MLflow run per job. ``identity`` gives its name, experiment and job tag."""

  def __init__(self, identity: Any, run_ids: Any, *, tracking_uri: str | None = None,
               experiment_name: str | None = None, tags: Mapping[str, str] | None = None):
    try:
      self._client = MlflowClient(tracking_uri=tracking_uri)
      self._run_id = self._continue_or_start(identity, run_ids, experiment_name or identity.group,
                                             dict(tags or {}))
    except MlflowException as e:
      raise UserError(f'MLflow could not start the run: {str(e).splitlines()[0]}') from e
    run_ids.record('mlflow', {'run_id': self._run_id,
                              'tracking_uri': self._client.tracking_uri})
    self._separator = '.' if _is_file_store(self._client.tracking_uri) else '/'

  def _key(self, name: str) -> str:
    """``name`` as MLflow takes it (characters it refuses become ``_``; see the module doc)."""
    return re.sub(r'[^\w\-. :/]', '_', name).replace('/', self._separator)

  def _continue_or_start(self, identity: Any, run_ids: Any, experiment_name: str,
                         tags: dict[str, str]) -> str:
    saved = run_ids.get('mlflow')
    if saved.get('run_id'):
      try:
        run = self._client.get_run(saved['run_id'])
      except MlflowException:
        logging.warning('MLflow run %s (trackers.json) is not in %s; starting a new run.',
                        saved['run_id'], self._client.tracking_uri)
      else:
        self._client.update_run(run.info.run_id, status='RUNNING')
        return run.info.run_id
    experiment = self._client.get_experiment_by_name(experiment_name)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else self._client.create_experiment(experiment_name))
    run = self._client.create_run(
        experiment_id, run_name=identity.tracker_run_name(),
        tags={'t5train.job': identity.job, 't5train.run_dir': identity.directory, **tags})
    return run.info.run_id

  def describe(self) -> str:
    return f'MLflow run {self._run_id} at {self._client.tracking_uri}'

  @property
  def run_id(self) -> str:
    return self._run_id

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    now = int(time.time() * 1000)
    entries = [Metric(self._key(tag), float(np.asarray(value)), now, int(step))
               for tag, value in scalars.items()]
    for start in range(0, len(entries), _BATCH):
      self._client.log_batch(self._run_id, metrics=entries[start:start + _BATCH])

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for tag, text in texts.items():
      self._client.log_text(self._run_id, text, f'texts/{tag}/step_{int(step):08d}.md')

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Params are fixed once logged: a resumed run logs only the new ones, and warns about
    values that changed (the run's ``config.gin`` text keeps every version)."""
    hparams = {self._key(key): value for key, value in hparams.items()}
    logged = self._client.get_run(self._run_id).data.params
    changed = sorted(key for key, value in hparams.items()
                     if key in logged and logged[key] != _param_value(value))
    if changed:
      logging.warning('MLflow keeps the first value of a param; these changed since: %s',
                      ', '.join(changed))
    entries = [Param(key, _param_value(value)) for key, value in hparams.items() if key not in logged]
    for start in range(0, len(entries), _PARAM_BATCH):
      self._client.log_batch(self._run_id, params=entries[start:start + _PARAM_BATCH])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for tag, batch in images.items():
      for index, image in enumerate(np.asarray(batch)):
        self._client.log_image(self._run_id, image, key=f'{tag}/{index}', step=int(step))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    del metadata
    self.write_scalars(step, {tag: value for tag, value in values.items() if np.ndim(value) == 0})

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    del step, arrays, num_buckets  # MLflow has no histograms

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    del step, videos  # t5train writes none

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    del step, audios, sample_rate  # t5train writes none

  def flush(self) -> None:
    pass  # every call above is sent when it is made

  def close(self) -> None:
    if self._run_id is not None:
      self._client.set_terminated(self._run_id, status=RunStatus.to_string(RunStatus.FINISHED))
      self._run_id = None
