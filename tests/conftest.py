"""Test collection: the multi-device tests need 8 simulated devices, set before JAX starts.

tests/test_multidevice.py runs tests/multidevice/ in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the main run skips that folder.
"""

import os

MULTIDEVICE_ENV = 'T5TRAIN_MULTIDEVICE_RUN'

collect_ignore_glob = [] if os.environ.get(MULTIDEVICE_ENV) else ['multidevice/*']
