"""Runs tests/isolated/ in a subprocess of its own.

Those tests parse gin files in T5X's idiom (``from t5x import ...``, ``import __main__ as
train_script``). Gin keeps, for the rest of a process, the import through which it first
registered each function, so command-line bindings of later tests in the same process would
have to use T5X's names.
"""

import os
import subprocess
import sys

from conftest import ISOLATED_ENV

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_isolated_suite():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', ISOLATED_ENV: '1'}
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rf',
       os.path.join(TESTS, 'isolated')],
      cwd=os.path.dirname(TESTS), env=env, capture_output=True, text=True, timeout=1200)
  summary = result.stdout[-6000:]
  assert result.returncode == 0, summary + result.stderr[-2000:]
  assert ' passed' in summary and 'failed' not in summary, summary
