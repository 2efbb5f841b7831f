"""Runs tests/multidevice/ in a subprocess with 8 simulated CPU devices.

JAX fixes the device count when it starts, so these tests cannot share a
process with the rest of the suite.
"""

from conftest import MULTIDEVICE_ENV, run_folder_in_subprocess, xla_flags_for_devices


def test_multidevice_suite():
  run_folder_in_subprocess('multidevice', {MULTIDEVICE_ENV: '1',
                                           'XLA_FLAGS': xla_flags_for_devices(8)})
