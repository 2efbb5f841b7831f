"""``t5x.gin_utils``: T5X's gin helpers, over t5train's."""

from __future__ import annotations

from typing import Any

import gin

from t5train import multihost, paths
from t5train.gin_utils import rewrite_gin_args  # noqa: F401  (T5X's name)


def summarize_gin_config(model_dir: str, summary_writer: Any = None, step: int = 0) -> None:
  """T5X's ``summarize_gin_config``: writes the operative gin config to ``model_dir/config.gin``
  and, given a clu metric writer, as a TensorBoard text summary named ``config``.

  T5X's run files bind it as ``train_script.train.summarize_config_fn``; t5train's train
  writes ``config.gin`` itself, so the binding is accepted there and changes nothing.
  """
  if not multihost.is_primary():
    return
  config_str = gin.operative_config_str()
  paths.write_text_atomically(paths.join(model_dir, 'config.gin'), config_str)
  if summary_writer is not None:
    summary_writer.write_texts(step, {'config': gin.markdown(config_str)})
    summary_writer.flush()


__all__ = ['rewrite_gin_args', 'summarize_gin_config']
