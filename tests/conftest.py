"""Test collection: the multi-device tests need 8 simulated devices, set before JAX starts.

tests/test_multidevice.py runs tests/multidevice/ in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the main run skips that folder.

Every process of the suite (the test workers and the binaries they start, which inherit the
environment) shares JAX's persistent compilation cache, so a program that several tests
compile (the tiny model's train step, above all) is compiled once. A cached executable is the
same program, so no result depends on it; it only saves the compile time.
"""

import os
import tempfile

MULTIDEVICE_ENV = 'T5TRAIN_MULTIDEVICE_RUN'

collect_ignore_glob = [] if os.environ.get(MULTIDEVICE_ENV) else ['multidevice/*']

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 't5train-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
