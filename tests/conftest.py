"""Test collection: the multi-device tests need 8 simulated devices, set before JAX starts.

tests/test_multidevice.py runs tests/multidevice/ in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, and tests/test_isolated.py runs
tests/isolated/ (tests that give gin T5X's module names and ``__main__``, which gin remembers for
the rest of a process) in a process of their own; the main run skips both folders.

Every process of the suite (the test workers and the binaries they start, which inherit the
environment) shares JAX's persistent compilation cache, so a program that several tests
compile (the tiny model's train step, above all) is compiled once. A cached executable is the
same program, so no result depends on it; it only saves the compile time. The tests' models are
tiny, so XLA compiles them without LLVM's optimisations: with a cold cache (as in CI) the suite
spends about 15% less time compiling, and the programs run about as fast.
"""

import os
import tempfile

MULTIDEVICE_ENV = 'T5TRAIN_MULTIDEVICE_RUN'
ISOLATED_ENV = 'T5TRAIN_ISOLATED_RUN'

collect_ignore_glob = ([] if os.environ.get(MULTIDEVICE_ENV) else ['multidevice/*']) + (
    [] if os.environ.get(ISOLATED_ENV) else ['isolated/*'])

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 't5train-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

_FAST_COMPILE = '--xla_backend_optimization_level=0'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def xla_flags_for_devices(count: int) -> str:
  """XLA_FLAGS for a process with ``count`` simulated CPU devices, keeping the suite's flags."""
  return f"--xla_force_host_platform_device_count={count} {os.environ.get('XLA_FLAGS', '')}".strip()


def run_folder_in_subprocess(folder: str, env: dict) -> None:
  """Runs the tests of ``tests/<folder>`` in a pytest process of their own, with ``env`` added
  to the environment, and asserts that they all passed (none skipped)."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  tests = os.path.dirname(os.path.abspath(__file__))
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rf',
       os.path.join(tests, folder)],
      cwd=os.path.dirname(tests), env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
      capture_output=True, text=True, timeout=1200)
  summary = result.stdout[-6000:]
  assert result.returncode == 0, summary + result.stderr[-2000:]
  assert ' passed' in summary and 'skipped' not in summary and 'failed' not in summary, summary
