"""Every binary with its paths on a gs:// bucket, served locally by tests/gcs_emulator.py.

One run goes through train, a resume stopped by SIGTERM, infer, eval and both directions of
convert, all on the bucket; the test reads back what they wrote through etils.epath. Binaries
that do not depend on each other run at the same time: each spends most of its time starting.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import gcs_emulator
import pytest
from binaries import REPO, SMOKE
from etils import epath

BUCKET = 't5train-test'
MODEL = '--gin_file=gin/models/t5_1_1/tiny.gin'


@pytest.fixture
def gcs_env():
  """The emulator's environment variables, set in os.environ: the binaries inherit them, and
  this process reads the bucket with them."""
  if not shutil.which('openssl'):
    pytest.skip('the GCS emulator makes its TLS certificate with the openssl command')
  with gcs_emulator.serve(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    yield env


class Binary:
  """``python -m MODULE ARGS`` on the CPU in the background, its output in a file."""

  def __init__(self, log_file, module, *args):
    self.log_file = log_file
    with open(log_file, 'w') as log:
      self.process = subprocess.Popen([sys.executable, '-m', module, *args], cwd=REPO,
                                      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                                      stdout=log, stderr=subprocess.STDOUT)

  def log(self):
    return self.log_file.read_text()

  def wait_for(self, text, timeout=300):
    """Waits until ``text`` appears in the output."""
    deadline = time.monotonic() + timeout
    while text not in self.log():
      assert self.process.poll() is None and time.monotonic() < deadline, (
          f'no {text!r}:\n{self.log()[-3000:]}')
      time.sleep(0.2)

  def succeeds(self):
    """Waits for the binary to exit with status 0; returns its output."""
    status = self.process.wait(timeout=600)
    assert status == 0, self.log()[-3000:]
    return self.log()


@pytest.fixture
def start(gcs_env, tmp_path):
  """``start(module, *args)`` runs a Binary on the bucket; those still running at the end are killed."""
  started = []
  def start(module, *args):
    started.append(Binary(tmp_path / f'{len(started)}-{module}.log', module, *args))
    return started[-1]
  yield start
  for binary in started:
    if binary.process.poll() is None:
      binary.process.kill()
      binary.process.wait()


def test_train_resume_infer_eval_and_convert_on_a_bucket(start):
  bucket = epath.Path(f'gs://{BUCKET}')
  run, hf, imported = bucket / 'run', bucket / 'hf', bucket / 'imported'
  train = [*SMOKE, f"--gin.MODEL_DIR='{run}'", '--gin.EVAL_PERIOD=0', '--gin.SUMMARY_PERIOD=1']

  start('t5train.train', *train, '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=2').succeeds()

  resumed = start('t5train.train', *train, '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1000',
                  '--gin.train_script.train.log_every_secs=0')
  exported = start('t5train.convert', '--to=hf', f'--input={run}/checkpoint_2', MODEL,
                   f'--output={hf}')
  resumed.wait_for('step 3/')
  resumed.process.send_signal(signal.SIGTERM)
  log = resumed.succeeds()
  assert f'Resuming from {run}/checkpoint_2.' in log and 'Data iterator restored' in log, log[-3000:]
  stopped = re.search(r'Stopped by SIGTERM after step (\d+)', log)
  assert stopped, log[-3000:]
  step = int(stopped[1])
  assert sorted(p.name for p in run.iterdir()) == [
      'checkpoint_2', f'checkpoint_{step}', 'config.gin', 'model-info.txt', 'train']
  assert (run / f'checkpoint_{step}' / 'commit_success.txt').exists()
  assert list(run.glob('train/events.out.tfevents.*'))
  exported.succeeds()
  assert sorted(p.name for p in hf.iterdir()) == ['config.json', 'model.safetensors']

  # An interrupted save on a bucket keeps its final name; without its commit file it is skipped.
  (run / 'checkpoint_999' / 'state' / '_METADATA').write_text('{}')
  inferred = start('t5train.infer', '--gin_file=gin/runs/infer.gin', f'--gin_file={run}/config.gin',
                   f"--gin.CHECKPOINT_PATH='{run}/checkpoint_{step}'",
                   f"--gin.INFER_OUTPUT_DIR='{run}/infer'", '--gin.BATCH_SIZE=8',
                   '--gin.infer_script.infer.num_examples=8')
  evaluated = start('t5train.eval', MODEL, '--gin_file=gin/runs/eval.gin',
                    '--gin_file=gin/tasks/demo.gin', f"--gin.CHECKPOINT_PATH='{run}'",
                    "--gin.RESTORE_MODE='latest'", f"--gin.EVAL_OUTPUT_DIR='{run}/eval'",
                    '--gin.BATCH_SIZE=8', '--gin.eval_script.evaluate.num_examples=8')
  reimported = start('t5train.convert', '--from=hf', f'--input={hf}', f'--output={imported}')

  inferred.succeeds()
  records = (run / 'infer' / 'sort_digits-predict.jsonl').read_text().splitlines()
  assert len(records) == 8 and set(json.loads(records[0])) == {'inputs', 'targets', 'prediction'}
  evaluated.succeeds()
  metrics = json.loads((run / 'eval' / 'metrics.json').read_text())
  assert list(metrics) == [str(step)] and 'exact_match' in metrics[str(step)]['sort_digits']
  reimported.succeeds()
  assert sorted(p.name for p in imported.iterdir()) == ['checkpoint_0', 'model.gin']
  assert (imported / 'checkpoint_0' / 'state' / 'commit_success.txt').exists()
  assert f"INITIAL_CHECKPOINT_PATH=\"'{imported}/checkpoint_0'\"" in (
      imported / 'model.gin').read_text()
