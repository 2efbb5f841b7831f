"""Weights & Biases as a clu ``MetricWriter`` (``METRIC_WRITERS`` with ``'wandb'``).

Imported by ``trackers`` only when W&B is asked for, since it imports ``wandb`` (and clu's
metric writers, which import TensorFlow). The run's id is chosen here and kept in the run
directory's ``trackers.json`` before W&B starts, so a resumed or restarted job continues the
same W&B run (``resume='allow'``). In offline mode (``WANDB_MODE=offline``) W&B writes the run
under ``<local_dir>/wandb/offline-run-*``, for ``wandb sync`` later.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import wandb
from clu.metric_writers import interface
from wandb.sdk.lib import runid

from t5train.errors import UserError

_DEFAULT_PROJECT = 't5train'


class WandbWriter(interface.MetricWriter):
  """Scalars, texts, images and histograms of one job into one W&B run; hparams into its
  config. ``identity`` gives the run's name, group and job type; ``run_ids`` keeps its id."""

  def __init__(self, identity: Any, run_ids: Any, *, project: str | None = None,
               entity: str | None = None, tags: Sequence[str] = (), mode: str | None = None,
               local_dir: str):
    saved = run_ids.get('wandb')
    run_id = saved.get('run_id') or runid.generate_id()
    project = project or saved.get('project') or os.environ.get('WANDB_PROJECT') or _DEFAULT_PROJECT
    run_ids.record('wandb', {'run_id': run_id, 'project': project, 'entity': entity})
    os.makedirs(local_dir, exist_ok=True)
    try:
      self._run = wandb.init(
          project=project, entity=entity, id=run_id, resume='allow', name=identity.tracker_run_name(),
          group=identity.group, job_type=identity.job, tags=list(tags) or None, mode=mode,
          dir=local_dir, reinit='create_new',
          settings=wandb.Settings(console='off', save_code=False, disable_git=True))
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:
      raise UserError(f'W&B could not start the run: {str(e).splitlines()[0]} (run `wandb login`, '
                      'or set WANDB_MODE=offline and `wandb sync` later)') from e

  def describe(self) -> str:
    mode = 'offline' if self._run.offline else 'online'
    return f'W&B run {self._run.id} in project {self._run.project}, {mode}'

  @property
  def run_id(self) -> str:
    return self._run.id

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._run.log({tag: float(np.asarray(value)) for tag, value in scalars.items()}, step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Texts as HTML panels (the Markdown TensorBoard renders, shown as written)."""
    self._run.log({tag: wandb.Html(f'<pre>{html.escape(text)}</pre>') for tag, text in texts.items()},
                  step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._run.config.update(dict(hparams), allow_val_change=True)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    self._run.log({tag: [wandb.Image(image) for image in np.asarray(batch)]
                   for tag, batch in images.items()}, step=int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None) -> None:
    self._run.log({tag: wandb.Histogram(np.asarray(array), num_bins=(num_buckets or {}).get(tag, 64))
                   for tag, array in arrays.items()}, step=int(step))

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> None:
    del metadata
    self.write_scalars(step, {tag: value for tag, value in values.items() if np.ndim(value) == 0})

  def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
    del step, videos  # t5train writes none

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
    del step, audios, sample_rate  # t5train writes none

  def flush(self) -> None:
    pass  # W&B sends in the background; finish() waits for it

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None
