"""Nothing lost: real training subprocesses stopped, killed and fed NaN, then resumed.

Each test runs the train binary on tiny.gin and the built-in task and checks
what must hold afterwards: exact resumes, a checkpoint at a SIGTERM, no broken
checkpoint after a SIGKILL, a clear stop on NaN.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from binaries import REPO, SMOKE, read_params, read_scalars, run_train

RUN = SMOKE + ['--gin.SUMMARY_PERIOD=1', '--gin.EVAL_PERIOD=0']


def losses(model_dir):
  return read_scalars(os.path.join(model_dir, 'train'))['loss']


def assert_same_params(dir_a, dir_b):
  a, b = read_params(dir_a), read_params(dir_b)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  args = ['--gin.CHECKPOINT_PERIOD=3']
  assert run_train(*RUN, *args, f"--gin.MODEL_DIR='{whole}'", '--gin.TRAIN_STEPS=6').returncode == 0
  assert run_train(*RUN, *args, f"--gin.MODEL_DIR='{split}'", '--gin.TRAIN_STEPS=3').returncode == 0
  resumed = run_train(*RUN, *args, f"--gin.MODEL_DIR='{split}'", '--gin.TRAIN_STEPS=6')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Data iterator restored' in resumed.stderr
  assert losses(split) == losses(whole)  # bit for bit, steps 1 to 6
  assert_same_params(f'{whole}/checkpoint_6', f'{split}/checkpoint_6')


def start_training(model_dir, *args):
  """The train binary in the background, logging a progress line after every step."""
  command = [sys.executable, '-m', 't5train.train', *RUN, f"--gin.MODEL_DIR='{model_dir}'",
             '--gin.train_script.train.log_every_secs=0', *args]
  return subprocess.Popen(command, cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def wait_for_step(process, step):
  """Reads the progress lines until step ``step`` is reported; returns the lines read."""
  lines = []
  for line in process.stderr:
    lines.append(line)
    if f'step {step}/' in line:
      return lines
  tail = ''.join(lines[-30:])
  raise AssertionError(f'training ended before step {step}:\n{tail}')


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
  model_dir = str(tmp_path)
  process = start_training(model_dir, '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1000')
  wait_for_step(process, 3)
  process.send_signal(signal.SIGTERM)
  output = process.stderr.read()
  assert process.wait(timeout=300) == 0, output[-3000:]
  stopped = [line for line in output.splitlines() if 'Stopped by SIGTERM after step' in line]
  assert stopped, output[-3000:]
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert 3 <= step < 500
  assert sorted(os.listdir(model_dir)) == [f'checkpoint_{step}', 'config.gin', 'model-info.txt',
                                           'train']
  resumed = run_train(*RUN, f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={step + 1}',
                      '--gin.CHECKPOINT_PERIOD=1000')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from {model_dir}/checkpoint_{step}' in resumed.stderr
  assert 'Data iterator restored' in resumed.stderr


def test_sigterm_while_starting_stops_cleanly_with_status_0(tmp_path):
  """The signal arrives while the run restores, compiles and builds its pipeline."""
  process = start_training(str(tmp_path), '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1000')
  first = process.stderr.readline()  # the binary is past its imports and setting up
  process.send_signal(signal.SIGTERM)
  output = first + process.stderr.read()
  assert process.wait(timeout=300) == 0, output[-3000:]
  assert re.search(r'Stopped by SIGTERM (before step 1|after step \d+)', output), output[-3000:]
  assert 'Traceback' not in output
  assert not [name for name in os.listdir(tmp_path) if name.startswith('checkpoint_')
              and int(name.split('_')[1]) > 10]


def test_a_second_signal_exits_at_once(tmp_path):
  process = start_training(str(tmp_path), '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1000')
  wait_for_step(process, 2)
  process.send_signal(signal.SIGTERM)
  process.send_signal(signal.SIGINT)
  output = process.stderr.read()
  status = process.wait(timeout=300)
  # The two pending signals may be handled in either order; the second one decides.
  second = signal.Signals(status - 128) if status > 128 else None
  assert second in (signal.SIGTERM, signal.SIGINT), output[-3000:]
  assert f'Received a second signal ({second.name}): exiting now' in output
  assert 'Stopped by' not in output and not any(
      name.startswith('checkpoint_') for name in os.listdir(tmp_path))


def test_sigkill_never_leaves_a_checkpoint_that_restores_wrongly(tmp_path):
  model_dir = str(tmp_path)
  # A checkpoint at every step, written asynchronously: a kill lands in or between saves.
  process = start_training(model_dir, '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1')
  wait_for_step(process, 4)
  time.sleep(0.2)
  process.kill()
  process.wait(timeout=60)
  complete = sorted(int(name.split('_')[1]) for name in os.listdir(model_dir)
                    if name.startswith('checkpoint_') and name.split('_')[1].isdigit())
  assert complete, os.listdir(model_dir)
  resumed = run_train(*RUN, f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={complete[-1] + 1}',
                      '--gin.CHECKPOINT_PERIOD=1')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from {model_dir}/checkpoint_{complete[-1]}' in resumed.stderr
  leftovers = [name for name in os.listdir(model_dir) if 'tmp' in name]
  assert not leftovers  # unfinished saves were cleaned up


NAN_GIN = """
from __gin__ import dynamic_registration
from t5train import testing
from t5train import train as train_script

train_script.train.learning_rate_fn = @testing.nan_learning_rate()
testing.nan_learning_rate.from_step = 4  # the update of step 5 is NaN
"""


def test_nan_stops_training_and_keeps_the_good_checkpoints(tmp_path):
  nan_gin = tmp_path / 'nan.gin'
  nan_gin.write_text(NAN_GIN)
  model_dir = str(tmp_path / 'run')
  result = run_train(*RUN, f'--gin_file={nan_gin}', f"--gin.MODEL_DIR='{model_dir}'",
                     '--gin.TRAIN_STEPS=8', '--gin.CHECKPOINT_PERIOD=1')
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('t5train.train: error: the loss or gradients became NaN or infinite at '
                         'step 5'), last
  saved = sorted(name for name in os.listdir(model_dir) if name.startswith('checkpoint_'))
  assert saved == ['checkpoint_1', 'checkpoint_2', 'checkpoint_3', 'checkpoint_4']
  assert all(np.isfinite(v).all() for v in read_params(f'{model_dir}/checkpoint_4').values())


def test_nan_steps_can_be_skipped_and_counted(tmp_path):
  nan_gin = tmp_path / 'nan.gin'
  nan_gin.write_text(NAN_GIN)
  model_dir = str(tmp_path / 'run')
  result = run_train(*RUN, f'--gin_file={nan_gin}', f"--gin.MODEL_DIR='{model_dir}'",
                     '--gin.TRAIN_STEPS=6', '--gin.CHECKPOINT_PERIOD=4',
                     '--gin.train_script.train.skip_nonfinite_steps=True')
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = dict(read_scalars(os.path.join(model_dir, 'train'))['nonfinite_step_fraction'])
  assert skipped == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0, 6: 1.0}
  assert_same_params(f'{model_dir}/checkpoint_4', f'{model_dir}/checkpoint_6')  # 5, 6 skipped


# Files may not grow past 300 kB, as if the disk were full: writes fail with EFBIG (SIGXFSZ is
# ignored so that they fail rather than kill the process).
SMALL_FILES = ['bash', '-c', 'trap "" XFSZ; ulimit -f 300; exec "$@"', 'bash']


def test_a_full_disk_or_a_damaged_checkpoint_is_a_clear_error_and_earlier_ones_survive(tmp_path):
  model_dir = str(tmp_path)
  args = [*RUN, f"--gin.MODEL_DIR='{model_dir}'", '--gin.CHECKPOINT_PERIOD=2']
  assert run_train(*args, '--gin.TRAIN_STEPS=4').returncode == 0

  full = subprocess.run([*SMALL_FILES, sys.executable, '-m', 't5train.train', *args,
                         '--gin.TRAIN_STEPS=6'],
                        cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, text=True,
                        capture_output=True, timeout=600)
  assert full.returncode == 1, full.stderr[-3000:]
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith(f't5train.train: error: cannot write {model_dir}/checkpoint_6: the disk '
                         'is full (File too large); checkpoint_4 and earlier are intact'), last

  state_dir = os.path.join(model_dir, 'checkpoint_4', 'state')
  array_files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
                 for name in names if os.path.getsize(os.path.join(root, name)) > 100_000]
  assert array_files
  for path in array_files:  # the large files hold the arrays; cut them short
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  damaged = run_train(*args, '--gin.TRAIN_STEPS=6')
  assert damaged.returncode == 2, damaged.stderr[-3000:]
  last = damaged.stderr.strip().splitlines()[-1]
  assert re.match(rf't5train.train: error: cannot restore {re.escape(model_dir)}/checkpoint_4: '
                  r'\S+ cannot be read, so the checkpoint is damaged', last), last
  assert 'Traceback' not in damaged.stderr

  shutil.rmtree(os.path.join(model_dir, 'checkpoint_4'))  # as the message advises
  resumed = run_train(*args, '--gin.TRAIN_STEPS=3')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from {model_dir}/checkpoint_2' in resumed.stderr
  assert 'Data iterator restored' in resumed.stderr
  assert not [name for name in os.listdir(model_dir) if 'tmp' in name]
