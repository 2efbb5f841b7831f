"""Two hosts simulated on this machine: 2 processes x 2 CPU devices over jax.distributed.

They must train exactly as one process with 4 devices would (same global batches,
same losses, same parameters), write the run's files once, and leave a checkpoint
that one process resumes from.
"""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from binaries import REPO, SMOKE, read_params, read_scalars, run_train

from t5train import testing

# Unshuffled, unpacked examples: host h reads examples h, h + 2, h + 4, ..., so the two hosts'
# batches together hold the same examples as the one-host batch.
RUN = SMOKE + ['--gin.BATCH_SIZE=8', '--gin.SUMMARY_PERIOD=1', '--gin.CHECKPOINT_PERIOD=4',
               '--gin.train/data.DatasetConfig.shuffle=False',
               '--gin.train/data.DatasetConfig.pack=False']
FOUR_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}


def launch_two_hosts(*args):
  command = [os.path.join(REPO, 'scripts', 'launch_local.sh'), '2', '2', sys.executable, '-m',
             't5train.train', *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  two_hosts, one_host = (str(tmp_path_factory.mktemp(name)) for name in ('two', 'one'))
  launched = launch_two_hosts(*RUN, f"--gin.MODEL_DIR='{two_hosts}'", '--gin.TRAIN_STEPS=4')
  assert launched.returncode == 0, launched.stdout[-4000:]
  single = run_train(*RUN, f"--gin.MODEL_DIR='{one_host}'", '--gin.TRAIN_STEPS=4',
                     env=FOUR_DEVICES)
  assert single.returncode == 0, single.stderr[-3000:]
  return two_hosts, one_host, launched.stdout


def losses(model_dir):
  return dict(read_scalars(os.path.join(model_dir, 'train'))['loss'])


def test_both_processes_joined_one_mesh(runs):
  _, _, output = runs
  assert '[process 0]' in output and '[process 1]' in output
  assert 'Process 1 of 2: 2 local devices, 4 in all.' in output


def test_two_hosts_train_like_one_host_with_four_devices(runs):
  two_hosts, one_host, _ = runs
  two, one = losses(two_hosts), losses(one_host)
  assert sorted(two) == [1, 2, 3, 4]
  # Collectives across two processes reduce in other orders than within one: composite results.
  testing.assert_trees_close(two, one)
  expected = read_params(os.path.join(one_host, 'checkpoint_4'))
  actual = read_params(os.path.join(two_hosts, 'checkpoint_4'))
  assert sorted(actual) == sorted(expected)
  testing.assert_trees_close(actual, expected)


def test_run_files_are_written_once(runs):
  two_hosts, _, output = runs
  assert len(glob.glob(os.path.join(two_hosts, 'train', 'events.out.tfevents.*'))) == 1
  assert os.path.isfile(os.path.join(two_hosts, 'config.gin'))
  assert os.path.isfile(os.path.join(two_hosts, 'model-info.txt'))
  # Process 1 logs warnings only, so the progress lines come from process 0.
  assert '[process 0]' in output and 'step 4/4' in output
  assert not [line for line in output.splitlines()
              if line.startswith('[process 1]') and 'step 4/4' in line]


def test_one_host_resumes_what_two_hosts_saved(runs):
  two_hosts, one_host, _ = runs
  # The two hosts saved one data position each, which one host cannot continue: its stream
  # starts afresh (seed + step). The one-host reference is told to start afresh too.
  for model_dir, extra in ((two_hosts, []), (one_host, [
      '--gin.checkpoints.SaveCheckpointConfig.save_dataset=False'])):
    resumed = run_train(*RUN, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=5', *extra,
                        env=FOUR_DEVICES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'Resuming from {model_dir}/checkpoint_4' in resumed.stderr
    assert 'the data stream starts afresh' in resumed.stderr
  testing.assert_trees_close(losses(two_hosts)[5], losses(one_host)[5])


def test_a_signal_to_one_host_stops_both_after_the_same_step(tmp_path):
  model_dir = str(tmp_path)
  command = [os.path.join(REPO, 'scripts', 'launch_local.sh'), '2', '2', sys.executable, '-m',
             't5train.train', *RUN, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=500',
             '--gin.CHECKPOINT_PERIOD=1000', '--gin.train_script.train.log_every_secs=0']
  launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
  for line in launcher.stdout:
    if line.startswith('[process 0]') and 'step 3/' in line:
      break
  host_1 = []  # process 1's Python process (not the launcher's shells)
  for pid in os.listdir('/proc'):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        args = f.read().decode(errors='replace').split('\0')
    except OSError:
      continue
    if '--process_index=1' in args and f"--gin.MODEL_DIR='{model_dir}'" in args and 'python' in args[0]:
      host_1.append(int(pid))
  assert len(host_1) == 1, host_1
  os.kill(host_1[0], signal.SIGTERM)
  output = launcher.stdout.read()
  assert launcher.wait(timeout=300) == 0, output[-4000:]
  assert '[process 1]' in output and 'Received SIGTERM' in output
  stopped = [line for line in output.splitlines() if 'Stopped by a signal on another process' in line]
  assert stopped, output[-4000:]
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert os.path.isdir(os.path.join(model_dir, f'checkpoint_{step}'))
  saved = set(os.listdir(os.path.join(model_dir, f'checkpoint_{step}', 'dataset')))
  assert {'process_0-of-2.index', 'process_1-of-2.index'} <= saved  # each host's data position


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_host(index, port, model_dir, *args):
  """One host of a two-host run, started directly (the launcher would stop the survivor)."""
  command = [sys.executable, '-m', 't5train.train', *RUN, f"--gin.MODEL_DIR='{model_dir}'",
             '--gin.train_script.train.log_every_secs=0', *args, '--multiprocess',
             f'--coordinator_address=127.0.0.1:{port}', '--process_count=2',
             f'--process_index={index}', '--heartbeat_timeout_seconds=15']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE if index == 0 else subprocess.DEVNULL, text=True)


_PROGRESS = re.compile(r'step (\d+)/\d+  loss (\S+)  accuracy (\S+)')


def test_a_killed_host_ends_the_other_and_both_resume_exactly(tmp_path):
  """SIGKILL one host mid-run: the other exits non-zero within 60 s; relaunched, both resume
  from the last committed checkpoint and retrain the lost steps with the same losses."""
  model_dir = str(tmp_path)
  only_checkpoint_4 = ['--gin.CHECKPOINT_PERIOD=None', '--gin.checkpoints.SaveCheckpointConfig.steps=[4]']
  port = _free_port()
  hosts = [_start_host(i, port, model_dir, '--gin.TRAIN_STEPS=500', *only_checkpoint_4)
           for i in range(2)]
  first_run = {}
  for line in hosts[0].stderr:
    match = _PROGRESS.search(line)
    if match:
      first_run[int(match.group(1))] = match.groups()[1:]
      if int(match.group(1)) >= 6:
        break
  hosts[1].kill()
  killed = time.monotonic()
  try:
    hosts[0].communicate(timeout=120)
  except subprocess.TimeoutExpired:
    hosts[0].kill()
    raise AssertionError('the surviving host still runs 120 s after the other was killed')
  assert hosts[0].returncode != 0 and time.monotonic() - killed < 60, (
      hosts[0].returncode, time.monotonic() - killed)

  port = _free_port()
  hosts = [_start_host(i, port, model_dir, '--gin.TRAIN_STEPS=8', *only_checkpoint_4)
           for i in range(2)]
  output = hosts[0].stderr.read()
  assert [host.wait(timeout=300) for host in hosts] == [0, 0], output[-4000:]
  resumed_from = 4 if f'Resuming from {model_dir}/checkpoint_4' in output else 0
  second_run = {int(m.group(1)): m.groups()[1:] for m in _PROGRESS.finditer(output)}
  retrained = sorted(set(first_run) & set(second_run))
  assert retrained and retrained[0] == resumed_from + 1 and retrained[-1] >= 6, (first_run, second_run)
  assert {step: first_run[step] for step in retrained} == {step: second_run[step] for step in retrained}
