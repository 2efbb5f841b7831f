"""Runs tests/multidevice/ in a subprocess with 8 simulated CPU devices.

JAX fixes the device count when it starts, so these tests cannot share a
process with the rest of the suite.
"""

import os
import subprocess
import sys

from conftest import MULTIDEVICE_ENV, xla_flags_for_devices

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_multidevice_suite():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', MULTIDEVICE_ENV: '1',
         'XLA_FLAGS': xla_flags_for_devices(8)}
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rf',
       os.path.join(TESTS, 'multidevice')],
      cwd=os.path.dirname(TESTS), env=env, capture_output=True, text=True, timeout=1200)
  summary = result.stdout[-6000:]
  assert result.returncode == 0, summary + result.stderr[-2000:]
  assert ' passed' in summary and 'skipped' not in summary, summary
