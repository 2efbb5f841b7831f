"""Checking T5X's constructor arguments that t5train does not take as they are."""

from __future__ import annotations

from typing import Any

from t5train.errors import UserError


class Unset:
  """The default of an argument whose absence matters (``UNSET``)."""

  def __repr__(self) -> str:
    return 'UNSET'


UNSET: Any = Unset()


def require(name: str, value: Any, allowed: Any, why: str) -> None:
  """A UserError unless ``value`` is ``allowed`` (or one of them, given a list)."""
  choices = allowed if isinstance(allowed, list) else [allowed]
  if any(value is choice or _equal(value, choice) for choice in choices):
    return
  shown = ' or '.join(repr(choice) for choice in choices)
  raise UserError(f'{name} = {value!r} is not supported by t5train ({why}); leave it at {shown}')


def _equal(a: Any, b: Any) -> bool:
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except  (arrays, odd types)
    return False


def dtype_name(dtype: Any) -> str | None:
  """'float32' for 'float32', jnp.float32 or np.dtype('float32'); None for None."""
  if dtype is None:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    return np.dtype(dtype).name
  except TypeError:
    return str(dtype)
