"""``t5x.optimizers``: optax optimizers as T5X's run files configure them.

``OPTIMIZER = @optimizers.chain()`` with ``transformations = [@optax.clip(), @optax.adamw()]``
trains with that optax chain, its learning rate given in the optax transformation (as in
T5X, the trainer's ``learning_rate_fn`` is then unused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import optax

from t5train.optimizers import Adafactor, AdamW, MultiOptimizer, OptimizerDef  # noqa: F401


@dataclasses.dataclass(frozen=True)
class OptaxWrapper:
  """T5X's ``OptaxWrapper``: an optax ``GradientTransformation`` as t5train's optimizer."""

  optax_optimizer: optax.GradientTransformation

  def make(self, learning_rate_fn: Any) -> optax.GradientTransformation:
    del learning_rate_fn  # the optax transformation carries its own learning rate
    return self.optax_optimizer


def wrap_optax_optimizer(optax_optimizer: Any) -> Any:
  """T5X's ``wrap_optax_optimizer``: an optax optimizer constructor -> one of t5train's."""
  def wrapped(*args: Any, **kwargs: Any) -> OptaxWrapper:
    return OptaxWrapper(optax_optimizer(*args, **kwargs))
  return wrapped


def chain(transformations: Sequence[optax.GradientTransformation],
          name: str = 'chain') -> OptaxWrapper:
  """T5X's ``optimizers.chain``: ``optax.chain`` of the transformations."""
  del name
  return OptaxWrapper(optax.chain(*transformations))


__all__ = ['Adafactor', 'AdamW', 'MultiOptimizer', 'OptaxWrapper', 'chain',
           'wrap_optax_optimizer']
