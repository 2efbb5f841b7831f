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
from conftest import xla_flags_for_devices

from t5train import testing

# Unshuffled, unpacked examples: host h reads examples h, h + 2, h + 4, ..., so the two hosts'
# batches together hold the same examples as the one-host batch.
RUN = SMOKE + ['--gin.BATCH_SIZE=8', '--gin.SUMMARY_PERIOD=1', '--gin.CHECKPOINT_PERIOD=4',
               '--gin.train/data.DatasetConfig.shuffle=False',
               '--gin.train/data.DatasetConfig.pack=False']
FOUR_DEVICES = {'XLA_FLAGS': xla_flags_for_devices(4)}


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


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_host(index, port, model_dir, *args, log=None):
  """One host of a two-host run, started directly (the launcher would stop the survivor).
  Host 0's stderr is piped; host 1's goes to ``log``."""
  command = [sys.executable, '-m', 't5train.train', *RUN, f"--gin.MODEL_DIR='{model_dir}'",
             '--gin.train_script.train.log_every_secs=0', *args, '--multiprocess',
             f'--coordinator_address=127.0.0.1:{port}', '--process_count=2',
             f'--process_index={index}', '--heartbeat_timeout_seconds=15']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags_for_devices(2)}
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE if index == 0 else log or subprocess.DEVNULL,
                          text=True)


_PROGRESS = re.compile(r'step (\d+)/\d+  loss (\S+)  accuracy (\S+)')


def _read_progress(host, until_step):
  """(step -> (loss, accuracy), the text read) from host 0's stderr, up to ``until_step``."""
  progress, lines = {}, []
  for line in host.stderr:
    lines.append(line)
    match = _PROGRESS.search(line)
    if match:
      progress[int(match.group(1))] = match.groups()[1:]
      if int(match.group(1)) >= until_step:
        return progress, ''.join(lines)
  raise AssertionError(f'host 0 ended before step {until_step}: {"".join(lines[-30:])}')


def test_a_killed_host_ends_the_other_and_a_signal_stops_both_after_the_same_step(tmp_path):
  """SIGKILL one host mid-run: the other exits non-zero within 60 s. Relaunched, both resume
  from the last committed checkpoint and retrain the lost steps with the same losses; then a
  SIGTERM to one host stops both after the same step, with one checkpoint holding each host's
  data position."""
  model_dir = str(tmp_path / 'run')
  only_checkpoint_4 = ['--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=None',
                       '--gin.checkpoints.SaveCheckpointConfig.steps=[4]']
  port = _free_port()
  hosts = [_start_host(i, port, model_dir, *only_checkpoint_4) for i in range(2)]
  first_run, _ = _read_progress(hosts[0], 6)
  hosts[1].kill()
  killed = time.monotonic()
  try:
    hosts[0].communicate(timeout=120)
  except subprocess.TimeoutExpired as e:
    hosts[0].kill()
    raise AssertionError('the surviving host still runs 120 s after the other was killed') from e
  assert hosts[0].returncode != 0 and time.monotonic() - killed < 60, (
      hosts[0].returncode, time.monotonic() - killed)

  port = _free_port()
  with open(tmp_path / 'host_1.log', 'w') as log:
    hosts = [_start_host(i, port, model_dir, *only_checkpoint_4, log=log) for i in range(2)]
    second_run, output = _read_progress(hosts[0], max(first_run) + 1)
    hosts[1].send_signal(signal.SIGTERM)
    output += hosts[0].stderr.read()
    assert [host.wait(timeout=300) for host in hosts] == [0, 0], output[-4000:]
  resumed_from = 4 if f'Resuming from {model_dir}/checkpoint_4' in output else 0
  retrained = sorted(set(first_run) & set(second_run))
  assert retrained and retrained[0] == resumed_from + 1 and retrained[-1] >= 6, (first_run, second_run)
  assert {step: first_run[step] for step in retrained} == {step: second_run[step] for step in retrained}

  assert 'Received SIGTERM' in (tmp_path / 'host_1.log').read_text()
  stopped = re.search(r'Stopped by a signal on another process after step (\d+)', output)
  assert stopped, output[-4000:]
  step = int(stopped.group(1))
  assert step % 10 == 0  # the hosts compare notes every 10 steps
  saved = set(os.listdir(os.path.join(model_dir, f'checkpoint_{step}', 'dataset')))
  assert {'process_0-of-2.index', 'process_1-of-2.index'} <= saved  # each host's data position
