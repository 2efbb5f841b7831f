"""The infer and eval binaries in a subprocess, on checkpoints of a short tiny.gin run."""

import glob
import json
import os

import pytest
from binaries import SMOKE, run_binary, run_train

MODEL = ['--gin_file=gin/models/t5_1_1/tiny.gin']
TASK = ['--gin_file=gin/tasks/demo.gin']


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('run'))
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{path}'", '--gin.TRAIN_STEPS=4',
                     '--gin.CHECKPOINT_PERIOD=2')
  assert result.returncode == 0, result.stderr[-3000:]
  return path


def infer(checkpoint, output_dir, *args):
  return run_binary('t5train.infer', *MODEL, '--gin_file=gin/runs/infer.gin', *TASK,
                    f"--gin.CHECKPOINT_PATH='{checkpoint}'", f"--gin.INFER_OUTPUT_DIR='{output_dir}'",
                    '--gin.BATCH_SIZE=8', *args)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_infer_writes_a_record_per_example_and_skips_finished_tasks(model_dir, tmp_path):
  args = ['--gin.infer_script.infer.num_examples=20', '--gin.infer_script.infer.include_tokens=True']
  result = infer(f'{model_dir}/checkpoint_4', tmp_path, *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path) == ['sort_digits-predict.jsonl']
  records = read_jsonl(tmp_path / 'sort_digits-predict.jsonl')
  assert len(records) == 20
  assert all(set(r) == {'inputs', 'targets', 'prediction', 'prediction_tokens'} for r in records)
  assert all(r['inputs'].isdigit() and sorted(r['inputs']) == list(r['targets']) for r in records)
  assert all(isinstance(t, int) for r in records for t in r['prediction_tokens'])

  before = os.path.getmtime(tmp_path / 'sort_digits-predict.jsonl')
  again = infer(f'{model_dir}/checkpoint_4', tmp_path, *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'already exists; skipping sort_digits' in again.stderr
  assert os.path.getmtime(tmp_path / 'sort_digits-predict.jsonl') == before


def test_infer_scores_and_aux_from_a_file(model_dir, tmp_path):
  inputs = tmp_path / 'inputs.tsv'
  inputs.write_text('9876\t6789\n5512\t1255\n301\t013\n')
  out = tmp_path / 'out'
  for mode in ('predict_with_aux', 'score'):
    result = infer(model_dir, out, f"--gin.INPUT_FILE='{inputs}'",
                   f"--gin.infer_script.infer.mode='{mode}'")
    assert result.returncode == 0, result.stderr[-3000:]
  with_aux = read_jsonl(out / 'inputs.tsv-predict_with_aux.jsonl')
  scores = read_jsonl(out / 'inputs.tsv-score.jsonl')
  assert [r['inputs'] for r in with_aux] == ['9876', '5512', '301']
  assert all(r['aux']['scores'] <= 0 for r in with_aux)
  assert [set(r) for r in scores] == [{'inputs', 'targets', 'score'}] * 3
  assert all(r['score'] < 0 for r in scores)


def test_eval_all_checkpoints_in_step_order_then_skips_them(model_dir, tmp_path):
  args = [*MODEL, '--gin_file=gin/runs/eval.gin', *TASK, f"--gin.CHECKPOINT_PATH='{model_dir}'",
          f"--gin.EVAL_OUTPUT_DIR='{tmp_path}'", '--gin.BATCH_SIZE=8',
          '--gin.eval_script.evaluate.num_examples=16']
  result = run_binary('t5train.eval', *args)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith('step ')]
  assert [line.split()[1] for line in lines] == ['2', '4']
  metrics = json.loads((tmp_path / 'metrics.json').read_text())
  assert sorted(metrics) == ['2', '4']
  assert set(metrics['4']['sort_digits']) == {'exact_match', 'log_likelihood'}
  assert 0 <= metrics['4']['sort_digits']['exact_match'] <= 100
  assert metrics['4']['sort_digits']['log_likelihood'] < 0
  assert glob.glob(str(tmp_path / 'sort_digits' / 'events.out.tfevents.*'))

  again = run_binary('t5train.eval', *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Step 4 is already in' in again.stderr
  assert not [line for line in again.stdout.splitlines() if line.startswith('step ')]


@pytest.mark.parametrize('module,args,message', [
    ('t5train.infer', ["--gin.CHECKPOINT_PATH='/nonexistent/checkpoint_1'",
                       "--gin.INFER_OUTPUT_DIR='/tmp/t5train_bad_infer'"], 'does not exist'),
    ('t5train.eval', ["--gin.CHECKPOINT_PATH='{model_dir}'", "--gin.EVAL_OUTPUT_DIR='/tmp/x'",
                      "--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], 'no_such_task'),
], ids=['infer_missing_checkpoint', 'eval_unknown_task'])
def test_bad_input_exits_2(model_dir, module, args, message):
  run_file = 'gin/runs/infer.gin' if module.endswith('infer') else 'gin/runs/eval.gin'
  args = [a.format(model_dir=model_dir) for a in args]
  result = run_binary(module, *MODEL, f'--gin_file={run_file}', *TASK, *args)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'{module}: error:') and message in last, last
