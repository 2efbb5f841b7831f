"""``t5x.checkpoints``: t5train's checkpoint names where T5X has them."""

from t5train.checkpoints import (  # noqa: F401
  CheckpointManager,
  RestoreCheckpointConfig,
  SaveCheckpointConfig,
  select_checkpoints,
)
from t5train.t5x_compat.utils import Checkpointer  # noqa: F401

__all__ = ['CheckpointManager', 'Checkpointer', 'RestoreCheckpointConfig',
           'SaveCheckpointConfig', 'select_checkpoints']
