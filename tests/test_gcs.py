"""Every binary with its paths on a gs:// bucket, served locally by tests/gcs_emulator.py.

One run goes through train, a resume stopped by SIGTERM, infer, eval and both directions of
convert, all on the bucket; the test reads back what they wrote through etils.epath. Binaries
that do not depend on each other run at the same time: each spends most of its time starting.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gcs_emulator
import pytest
from binaries import REPO, SMOKE

BUCKET = 't5train-test'
RUN = f'gs://{BUCKET}/run'
HF, IMPORTED = f'gs://{BUCKET}/hf', f'gs://{BUCKET}/imported'
MODEL = '--gin_file=gin/models/t5_1_1/tiny.gin'
TRAIN = [*SMOKE, f"--gin.MODEL_DIR='{RUN}'", '--gin.EVAL_PERIOD=0', '--gin.SUMMARY_PERIOD=1']


@pytest.fixture
def gcs_env():
  """The emulator's environment variables, set in os.environ: the binaries inherit them, and this
  process reads the bucket back with them."""
  if not shutil.which('openssl'):
    pytest.skip('the GCS emulator makes its TLS certificate with the openssl command')
  with gcs_emulator.serve(BUCKET) as env, pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    yield env


class Binary:
  """``python -m MODULE ARGS`` on the CPU in the background, its output in a file."""

  def __init__(self, log_dir, module, *args):
    self.log_file = log_dir / f'{module}-{time.monotonic_ns()}.log'
    with open(self.log_file, 'w') as log:
      self.process = subprocess.Popen([sys.executable, '-m', module, *args], cwd=REPO,
                                      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                                      stdout=log, stderr=subprocess.STDOUT)

  def wait_for(self, text):
    """Waits until ``text`` appears in the output."""
    while text not in self.log_file.read_text():
      assert self.process.poll() is None, f'ended before {text!r}:\n{self.log()[-3000:]}'
      time.sleep(0.2)

  def log(self):
    return self.log_file.read_text()

  def succeeds(self):
    """Waits for the binary to exit with status 0; returns its output."""
    status = self.process.wait(timeout=600)
    assert status == 0, self.log()[-3000:]
    return self.log()


def test_train_resume_infer_eval_and_convert_on_a_bucket(gcs_env, tmp_path):
  from etils import epath
  bucket = epath.Path(f'gs://{BUCKET}')
  run = bucket / 'run'
  start = lambda module, *args: Binary(tmp_path, module, *args)

  T0=time.time(); P=lambda m: print(m, round(time.time()-T0,1), flush=True)
  start('t5train.train', *TRAIN, '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=2').succeeds()

  P('train done')
  resumed = start('t5train.train', *TRAIN, '--gin.TRAIN_STEPS=500', '--gin.CHECKPOINT_PERIOD=1000',
                  '--gin.train_script.train.log_every_secs=0')
  exported = start('t5train.convert', '--to=hf', f'--input={RUN}/checkpoint_2', MODEL,
                   f'--output={HF}')
  resumed.wait_for('step 3/')
  resumed.process.send_signal(signal.SIGTERM)
  log = resumed.succeeds()
  P('log = resumed.succeeds()')
  assert f'Resuming from {RUN}/checkpoint_2.' in log and 'Data iterator restored' in log, log[-3000:]
  step = int(log.split('Stopped by SIGTERM after step ')[1].split(':')[0])
  assert sorted(p.name for p in run.iterdir()) == [
      'checkpoint_2', f'checkpoint_{step}', 'config.gin', 'model-info.txt', 'train']
  assert (run / f'checkpoint_{step}' / 'commit_success.txt').exists()
  assert list(run.glob('train/events.out.tfevents.*'))
  exported.succeeds()
  P('exported.succeeds()')
  assert sorted(p.name for p in (bucket / 'hf').iterdir()) == ['config.json', 'model.safetensors']

  inferred = start('t5train.infer', '--gin_file=gin/runs/infer.gin', f'--gin_file={RUN}/config.gin',
                   f"--gin.CHECKPOINT_PATH='{RUN}/checkpoint_{step}'",
                   f"--gin.INFER_OUTPUT_DIR='{RUN}/infer'", '--gin.BATCH_SIZE=8',
                   '--gin.infer_script.infer.num_examples=8')
  evaluated = start('t5train.eval', MODEL, '--gin_file=gin/runs/eval.gin',
                    '--gin_file=gin/tasks/demo.gin', f"--gin.CHECKPOINT_PATH='{RUN}'",
                    "--gin.RESTORE_MODE='latest'", f"--gin.EVAL_OUTPUT_DIR='{RUN}/eval'",
                    '--gin.BATCH_SIZE=8', '--gin.eval_script.evaluate.num_examples=8')
  imported = start('t5train.convert', '--from=hf', f'--input={HF}', f'--output={IMPORTED}')

  inferred.succeeds()
  P('inferred.succeeds()')
  records = (run / 'infer' / 'sort_digits-predict.jsonl').read_text().splitlines()
  assert len(records) == 8 and set(json.loads(records[0])) == {'inputs', 'targets', 'prediction'}
  evaluated.succeeds()
  P('evaluated.succeeds()')
  metrics = json.loads((run / 'eval' / 'metrics.json').read_text())
  assert list(metrics) == [str(step)] and 'exact_match' in metrics[str(step)]['sort_digits']
  imported.succeeds()
  P('imported.succeeds()')
  assert sorted(p.name for p in (bucket / 'imported').iterdir()) == ['checkpoint_0', 'model.gin']
  assert (bucket / 'imported' / 'checkpoint_0' / 'state' / 'commit_success.txt').exists()
  assert f"INITIAL_CHECKPOINT_PATH=\"'{IMPORTED}/checkpoint_0'\"" in (
      bucket / 'imported' / 'model.gin').read_text()
