"""Random-number set-up for accelerators."""

from __future__ import annotations

import jax


def set_hardware_rng_ops() -> None:
  """Uses the accelerators' own random-bit generator for JAX keys, as T5X does.

  ``unsafe_rbg`` keys are faster to split and use on TPU and GPU than threefry
  keys. The numbers differ from threefry's, so runs with and without this call
  are not comparable.
  """
  jax.config.update('jax_default_prng_impl', 'unsafe_rbg')
