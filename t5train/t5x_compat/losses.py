"""``t5x.losses``: t5train's loss functions under T5X's names."""

from t5train.losses import *  # noqa: F401,F403
from t5train.losses import (  # noqa: F401
  NUM_REAL_TARGET_TOKENS,
  compute_weighted_cross_entropy,
  cross_entropy_with_logits,
)
