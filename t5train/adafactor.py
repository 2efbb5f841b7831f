"""``t5train.adafactor.Adafactor``: the name T5X users write for the Adafactor optimizer.

The optimizer itself is ``optimizers.Adafactor`` (T5X's defaults on ``optax.adafactor``).
"""

from t5train.optimizers import Adafactor

__all__ = ['Adafactor']
