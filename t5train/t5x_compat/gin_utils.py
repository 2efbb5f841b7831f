"""``t5x.gin_utils``: T5X's gin helpers, over t5train's."""

from __future__ import annotations

from typing import Any

from t5train import summaries
from t5train.gin_utils import rewrite_gin_args  # noqa: F401  (T5X's name)


def summarize_gin_config(model_dir: str, summary_writer: Any = None, step: int = 0) -> None:
  """T5X's ``summarize_gin_config``: writes the operative gin config to ``model_dir/config.gin``
  and, given a clu metric writer, as a TensorBoard text summary named ``config``
  (``t5train.summaries.summarize_gin_config``, which t5train's train calls itself).

  T5X's run files bind it as ``train_script.train.summarize_config_fn``; t5train's train
  writes both itself, so the binding is accepted there and changes nothing.
  """
  summaries.summarize_gin_config(model_dir, summary_writer, step)


__all__ = ['rewrite_gin_args', 'summarize_gin_config']
