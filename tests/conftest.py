"""Test collection: the multi-device tests need 8 simulated devices, set before JAX starts.

tests/test_multidevice.py runs tests/multidevice/ in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the main run skips that folder.
"""

import os

MULTIDEVICE_ENV = 'T5TRAIN_MULTIDEVICE_RUN'

collect_ignore_glob = [] if os.environ.get(MULTIDEVICE_ENV) else ['multidevice/*']

# The binaries restart themselves on CPU to get glibc's huge-page tunable
# (t5train.host_memory); tests start their subprocesses with it already set, so that
# each of them runs as a restarted binary does without paying for the restart.
# tests/test_host_memory.py checks the restart itself.
_ENV_WITH_HUGE_PAGES = None
try:
  from t5train import host_memory as _host_memory
  _ENV_WITH_HUGE_PAGES = _host_memory.environment_with_huge_pages()
except ImportError:
  pass
if _ENV_WITH_HUGE_PAGES is not None:
  os.environ.update(_ENV_WITH_HUGE_PAGES)
