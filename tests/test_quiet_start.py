"""A clean console: TensorFlow's start-up notes about CUDA and CPU features are dropped, every
other line that reaches stderr is kept, and verbose runs still show the notes."""

import os
import subprocess
import sys

from t5train import quiet_start

NOISE = [
    'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR',
    'I0000 00:00:1796183518.660432    4961 cudart_stub.cc:31] Could not find cuda drivers on your '
    'machine, GPU will not be used.',
    'E0000 00:00:1796183258.721143    4051 cuda_platform.cc:52] failed call to cuInit: INTERNAL: '
    'CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)',
]
REAL = ['E0000 00:00:1796183258.721143    4051 some_kernel.cc:12] out of memory',
        'Traceback (most recent call last):', 'ValueError: CUDA error in my op']


def test_the_filter_drops_exactly_the_known_lines(capfd):
  with quiet_start.filtered_stderr():
    for line in NOISE[:2] + REAL[:1] + NOISE[2:] + REAL[1:]:
      os.write(2, (line + '\n').encode())
  assert capfd.readouterr().err.splitlines() == REAL


def test_verbose_flags_and_tf_log_level_ask_for_the_notes():
  assert not quiet_start.wants_startup_logs(['train', '--gin_file=x.gin'], {})
  assert not quiet_start.wants_startup_logs(['-v=0'], {'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert quiet_start.wants_startup_logs(['train', '--verbosity=1'], {})
  assert quiet_start.wants_startup_logs(['-v=2'], {})
  assert quiet_start.wants_startup_logs([], {'TF_CPP_MIN_LOG_LEVEL': '0'})
  # JAX sets 1 when imported, so a child of any process that imported JAX inherits it.
  assert not quiet_start.wants_startup_logs([], {'TF_CPP_MIN_LOG_LEVEL': '1'})


def test_verbose_runs_keep_the_notes():
  """With -v=1 the filter is not installed, so TensorFlow's notes reach stderr as before (the
  train binary's own run, in test_train_binary.py, shows that without it they are gone)."""
  code = 'import sys, t5train, tensorflow; print("started", file=sys.stderr)'
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  verbose = subprocess.run([sys.executable, '-c', code, '-v=1'], env=env, capture_output=True,
                           text=True, timeout=300, check=True).stderr.splitlines()
  assert verbose[-1] == 'started'
  # The project's machines have no CUDA driver, so TensorFlow always notes it when asked to.
  assert any(quiet_start.STARTUP_NOISE.search(line) for line in verbose), verbose
