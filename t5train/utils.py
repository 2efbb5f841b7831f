"""Re-exports of the names T5X users look for in ``t5x.utils``; no code of its own."""

from t5train.checkpoints import RestoreCheckpointConfig, SaveCheckpointConfig
from t5train.legacy_checkpoints import LegacyCheckpointManager, get_fallback_state
from t5train.model_info import log_model_info
from t5train.multihost import get_local_data
from t5train.optimizers import create_learning_rate_scheduler
from t5train.rng import set_hardware_rng_ops
from t5train.train_state import TrainState, TrainStateInitializer

__all__ = ['LegacyCheckpointManager', 'RestoreCheckpointConfig', 'SaveCheckpointConfig',
           'TrainState', 'TrainStateInitializer', 'create_learning_rate_scheduler',
           'get_fallback_state', 'get_local_data', 'log_model_info', 'set_hardware_rng_ops']
