"""A run's experiment trackers, chosen by name (the gin macro ``METRIC_WRITERS``).

TensorBoard is always written. ``'wandb'`` (Weights & Biases) and ``'mlflow'`` add a tracker
each, a clu ``MetricWriter`` (``wandb_writer``, ``mlflow_writer``) that gets what TensorBoard
gets: every ``SummaryWriter`` of the run forwards to them (``metrics.forward_to_tracker``).
This module is an edge, like the binaries that call it: nothing below imports it, and it
imports a tracker's package only when that tracker is asked for.

Only the primary process opens trackers. Each tracker run's id is kept in
``<run directory>/trackers.json``, so that a resumed run continues the same tracker run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from t5train import metrics, multihost, paths
from t5train.errors import UserError

TENSORBOARD = 'tensorboard'
# name: (the package that must be importable, the pip line that installs it)
TRACKERS = {'wandb': ('wandb', "pip install 't5train[wandb]'"),
            'mlflow': ('mlflow', "pip install 't5train[mlflow]'")}
TRACKERS_FILE = 'trackers.json'  # in the run directory: each tracker's run id, for resumes


def check_metric_writers(names: str | Sequence[str] | None) -> tuple[str, ...]:
  """The trackers that ``names`` (METRIC_WRITERS) asks for besides TensorBoard, in order.

  A UserError, before anything is compiled, for an unknown name or a tracker whose package
  is not installed (with the pip line that installs it).
  """
  if names is None:
    return ()
  if isinstance(names, str):
    names = [names]
  chosen = []
  for name in names:
    key = str(name).strip().lower()
    if key == TENSORBOARD:
      continue
    if key not in TRACKERS:
      raise UserError(f'METRIC_WRITERS names {name!r}, which is not a metric writer; choose from '
                      f'{", ".join([TENSORBOARD, *TRACKERS])}')
    package, pip_line = TRACKERS[key]
    if importlib.util.find_spec(package) is None:
      raise UserError(f'METRIC_WRITERS names {key!r}, but the {package} package is not '
                      f'installed: {pip_line}')
    if key not in chosen:
      chosen.append(key)
  return tuple(chosen)


@dataclasses.dataclass(frozen=True)
class RunIdentity:
  """How a job appears in the trackers: its run ``name`` and ``group`` (taken from the run
  directory: its name, and its parent folder's name), the ``job`` kind (``train``, ``eval``),
  and ``directory``, which keeps ``trackers.json``."""

  name: str
  group: str
  job: str
  directory: str

  @classmethod
  def of(cls, run_dir: str, job: str, directory: str | None = None) -> RunIdentity:
    """The identity of the run in ``run_dir`` (e.g. MODEL_DIR ``/exp/ablation/lr3``: name
    ``lr3``, group ``ablation``); ``trackers.json`` goes to ``directory`` (default ``run_dir``)."""
    parts = os.fspath(run_dir).rstrip('/').split('/')
    name = parts[-1] or 'run'
    group = parts[-2] if len(parts) > 1 and parts[-2] and not parts[-2].endswith(':') else name
    return cls(name=name, group=group, job=job, directory=directory or os.fspath(run_dir))

  def tracker_run_name(self) -> str:
    """The run's name, with the job kind unless it is training (``lr3``, ``lr3-eval``)."""
    return self.name if self.job == 'train' else f'{self.name}-{self.job}'


class RunIds:
  """The tracker runs recorded in ``<directory>/trackers.json`` (``{'wandb': {'run_id': ...}}``),
  read once and rewritten whole whenever a tracker records its run."""

  def __init__(self, directory: str):
    self._path = paths.join(directory, TRACKERS_FILE)
    path = paths.resolve(self._path)
    self._records: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

  def get(self, tracker: str) -> dict[str, Any]:
    return dict(self._records.get(tracker, {}))

  def record(self, tracker: str, values: Mapping[str, Any]) -> None:
    self._records[tracker] = dict(values)
    paths.write_text_atomically(self._path, json.dumps(self._records, indent=2, sort_keys=True))


def wandb_settings(project: str | None = None, entity: str | None = None,
                   tags: Sequence[str] = (), mode: str | None = None,
                   local_dir: str | None = None) -> dict[str, Any]:
  """Settings of the Weights & Biases writer, bound in gin (``from t5train import trackers``,
  ``trackers.wandb_settings.project = 'my-project'``).

  ``project`` defaults to ``WANDB_PROJECT`` or ``t5train``; ``mode`` (``online``, ``offline``)
  to W&B's own (``WANDB_MODE``); ``local_dir``, where W&B keeps its run files (for ``wandb
  sync``), to ``WANDB_DIR`` or else the run directory (a temporary folder for a bucket).
  """
  return {'project': project, 'entity': entity, 'tags': tuple(tags), 'mode': mode,
          'local_dir': local_dir}


def mlflow_settings(tracking_uri: str | None = None, experiment_name: str | None = None,
                    tags: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Settings of the MLflow writer, bound in gin (``from t5train import trackers``,
  ``trackers.mlflow_settings.tracking_uri = 'http://mlflow:5000'``).

  ``tracking_uri`` defaults to MLflow's own (``MLFLOW_TRACKING_URI``); ``experiment_name`` to
  the run's group (the parent folder of the run directory).
  """
  return {'tracking_uri': tracking_uri, 'experiment_name': experiment_name,
          'tags': dict(tags or {})}


def _wandb_local_dir(identity: RunIdentity, configured: str | None) -> str:
  if configured or os.environ.get('WANDB_DIR'):
    return configured or os.environ['WANDB_DIR']
  if paths.is_url(identity.directory):
    return tempfile.mkdtemp(prefix='t5train-wandb-')
  return identity.directory


def _open_writer(tracker: str, identity: RunIdentity, run_ids: RunIds) -> Any:
  """The clu MetricWriter of ``tracker`` for this job, continuing the run in ``run_ids``."""
  if tracker == 'wandb':
    from t5train import wandb_writer  # pylint: disable=g-import-not-at-top  (imports wandb)
    settings = wandb_settings()
    settings['local_dir'] = _wandb_local_dir(identity, settings['local_dir'])
    return wandb_writer.WandbWriter(identity, run_ids, **settings)
  from t5train import mlflow_writer  # pylint: disable=g-import-not-at-top  (imports mlflow)
  return mlflow_writer.MlflowWriter(identity, run_ids, **mlflow_settings())


def _combined(writers: Sequence[Any]) -> Any:
  if len(writers) == 1:
    return writers[0]
  from clu.metric_writers import multi_writer  # pylint: disable=g-import-not-at-top
  return multi_writer.MultiWriter(writers)


@contextlib.contextmanager
def open_trackers(trackers: Sequence[str], identity: RunIdentity, root_dir: str,
                  prefix: str = '') -> Iterator[Any]:
  """Opens ``trackers`` (names from ``check_metric_writers``) for the job ``identity``, and
  forwards what the ``SummaryWriter``s under ``root_dir`` write to them (tags prefixed with
  ``prefix``) until the block ends; then closes them. Yields the combined writer, or None on
  other processes and without trackers."""
  if not trackers or not multihost.is_primary():
    yield None
    return
  run_ids = RunIds(identity.directory)
  writers: list[Any] = []
  try:
    for tracker in trackers:
      writers.append(_open_writer(tracker, identity, run_ids))
      logging.info('Metrics go to %s too (%s).', tracker, writers[-1].describe())
    writer = _combined(writers)
    with metrics.forward_to_tracker(root_dir, writer, prefix):
      yield writer
  finally:
    for writer in writers:
      writer.close()
