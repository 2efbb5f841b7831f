"""The best checkpoint by an evaluation metric, and early stopping, in the train binary."""

import json
import os

import pytest
from binaries import SMOKE, run_train

from t5train import checkpoints
from t5train.best_checkpoint import BestCheckpointConfig
from t5train.errors import UserError

BEST = ('--gin.train_script.train.best_checkpoint_cfg=@best_checkpoint.BestCheckpointConfig()',
        "--gin.best_checkpoint.BestCheckpointConfig.metric='training_eval/sort_digits/loss'")
# A learning rate that ramps up to 4 over 10 steps: the validation loss of the tiny model falls
# for the first steps, then diverges (from step 5 on, measured: 2550, 2350, 2141, 1048, 2422,
# 2487, 2.3e4, ...), so its best is known to be at an early step and later ones never beat it.
TURNING = ("--gin.optimizers.create_learning_rate_scheduler.factors='constant * linear_warmup'",
           '--gin.optimizers.create_learning_rate_scheduler.base_learning_rate=4.0',
           '--gin.optimizers.create_learning_rate_scheduler.warmup_steps=10')


def test_keeps_the_best_and_stops_when_patience_runs_out(tmp_path):
  model_dir = tmp_path / 'run'
  result = run_train(*SMOKE, *BEST, *TURNING, f"--gin.MODEL_DIR='{model_dir}'",
                     '--gin.TRAIN_STEPS=12', '--gin.EVAL_PERIOD=1', '--gin.EVAL_STEPS=1',
                     '--gin.BATCH_SIZE=8', '--gin.CHECKPOINT_PERIOD=100',
                     '--gin.best_checkpoint.BestCheckpointConfig.patience=2')
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((model_dir / 'best' / 'best.json').read_text())
  losses = [float(line.split(' loss ')[1].split(',')[0]) for line in result.stderr.splitlines()
            if 'training_eval/sort_digits:' in line]
  best_step = losses.index(min(losses)) + 1
  assert record['step'] == best_step and record['value'] == pytest.approx(min(losses), rel=1e-3)
  # Two evaluations without improvement after the best, then the run stops with a checkpoint.
  assert len(losses) == best_step + 2 < 12
  assert record['evaluations_without_improvement'] == 2
  assert os.path.isdir(model_dir / f'checkpoint_{best_step + 2}')
  assert f'Stopped by early stopping after step {best_step + 2}' in result.stderr
  assert f'at step {best_step}: {model_dir}/best/checkpoint_{best_step}' in result.stderr
  # MODEL_DIR/best is a model directory of one checkpoint, for CHECKPOINT_PATH.
  selected = checkpoints.select_checkpoints(
      checkpoints.RestoreCheckpointConfig(path=str(model_dir / 'best')))
  assert [step for step, _ in selected] == [best_step]


def test_the_train_binary_checks_the_metric_before_training():
  """What train() runs before anything is compiled (a UserError: exit status 2)."""
  from t5train import data, testing  # noqa: PLC0415
  from t5train import train as train_lib  # noqa: PLC0415
  validation = data.DatasetConfig('sort_digits', {'inputs': 8, 'targets': 8}, split='validation')
  check = lambda metric: train_lib._check_best_metric(  # pylint: disable=protected-access
      BestCheckpointConfig(metric), testing.tiny_model(), 10, 2, validation, None)
  check('training_eval/sort_digits/accuracy')
  with pytest.raises(UserError, match="training_eval has no metric 'bleu'"):
    check('training_eval/sort_digits/bleu')
  with pytest.raises(UserError, match='no inference_eval runs in this training'):
    check('inference_eval/sort_digits/exact_match')


@pytest.mark.parametrize('metric, message', [
    ('inference_eval/sort_digits/exact_match', 'no inference_eval runs in this training'),
    ('training_eval/other_task/loss', "task 'other_task' is not evaluated"),
    ('loss', "must be '<kind>/<task>/<metric>'"),
])
def test_metric_names_are_checked(metric, message):
  with pytest.raises(UserError, match=message):
    BestCheckpointConfig(metric).check(['training_eval'], ['sort_digits'],
                                       {'training_eval': ['loss']})


def test_modes_and_improvement():
  assert BestCheckpointConfig('a/b/c').better(1.0, 2.0)
  assert not BestCheckpointConfig('a/b/c').better(float('nan'), None)
  assert BestCheckpointConfig('a/b/c', mode='max').better(3.0, 2.0)
  with pytest.raises(UserError, match="mode must be 'min' or 'max'"):
    BestCheckpointConfig('a/b/c', mode='lowest')
