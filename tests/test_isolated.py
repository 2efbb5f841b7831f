"""Runs tests/isolated/ in a subprocess of its own.

Those tests parse gin files in T5X's idiom (``from t5x import ...``, ``import __main__ as
train_script``). Gin keeps, for the rest of a process, the import through which it first
registered each function, so command-line bindings of later tests in the same process would
have to use T5X's names.
"""

from conftest import ISOLATED_ENV, run_folder_in_subprocess


def test_isolated_suite():
  run_folder_in_subprocess('isolated', {ISOLATED_ENV: '1'})
