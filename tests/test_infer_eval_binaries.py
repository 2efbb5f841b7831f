"""The infer and eval binaries on checkpoints of a short tiny.gin run: their gin functions in
this process (as the binaries call them after start-up), and bad input through the binaries."""

import glob
import json
import logging
import os

import pytest
from binaries import call_configured, run_binary

from t5train import eval as eval_script
from t5train import infer as infer_script
from t5train import train as train_script

MODEL = ['--gin_file=gin/models/t5_1_1/tiny.gin']
TASK = ['--gin_file=gin/tasks/demo.gin']
FILES = ['gin/models/t5_1_1/tiny.gin', 'gin/tasks/demo.gin']


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('run'))
  call_configured(train_script.train, [FILES[0], 'gin/runs/pretrain.gin', FILES[1]],
                  [f"MODEL_DIR = '{path}'", 'TRAIN_STEPS = 4', 'CHECKPOINT_PERIOD = 2'])
  return path


def infer(checkpoint, output_dir, *bindings):
  return call_configured(infer_script.infer, [FILES[0], 'gin/runs/infer.gin', FILES[1]],
                         [f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{output_dir}'",
                          'BATCH_SIZE = 8', *bindings])


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_infer_writes_a_record_per_example_and_skips_finished_tasks(model_dir, tmp_path, caplog):
  args = ['infer_script.infer.num_examples = 20', 'infer_script.infer.include_tokens = True']
  infer(f'{model_dir}/checkpoint_4', tmp_path, *args)
  assert os.listdir(tmp_path) == ['sort_digits-predict.jsonl']
  records = read_jsonl(tmp_path / 'sort_digits-predict.jsonl')
  assert len(records) == 20
  assert all(set(r) == {'inputs', 'targets', 'prediction', 'prediction_tokens'} for r in records)
  assert all(r['inputs'].isdigit() and sorted(r['inputs']) == list(r['targets']) for r in records)
  assert all(isinstance(t, int) for r in records for t in r['prediction_tokens'])

  before = os.path.getmtime(tmp_path / 'sort_digits-predict.jsonl')
  with caplog.at_level(logging.INFO):
    infer(f'{model_dir}/checkpoint_4', tmp_path, *args)
  assert 'already exists; skipping sort_digits' in caplog.text
  assert os.path.getmtime(tmp_path / 'sort_digits-predict.jsonl') == before


def test_infer_scores_and_aux_from_a_file(model_dir, tmp_path):
  inputs = tmp_path / 'inputs.tsv'
  inputs.write_text('9876\t6789\n5512\t1255\n301\t013\n')
  out = tmp_path / 'out'
  for mode in ('predict_with_aux', 'score'):
    infer(model_dir, out, f"INPUT_FILE = '{inputs}'", f"infer_script.infer.mode = '{mode}'")
  with_aux = read_jsonl(out / 'inputs.tsv-predict_with_aux.jsonl')
  scores = read_jsonl(out / 'inputs.tsv-score.jsonl')
  assert [r['inputs'] for r in with_aux] == ['9876', '5512', '301']
  assert all(r['aux']['scores'] <= 0 for r in with_aux)
  assert [set(r) for r in scores] == [{'inputs', 'targets', 'score'}] * 3
  assert all(r['score'] < 0 for r in scores)


def test_eval_all_checkpoints_in_step_order_then_skips_them(model_dir, tmp_path, capsys, caplog):
  def evaluate():
    call_configured(eval_script.evaluate, [FILES[0], 'gin/runs/eval.gin', FILES[1]],
                    [f"CHECKPOINT_PATH = '{model_dir}'", f"EVAL_OUTPUT_DIR = '{tmp_path}'",
                     'BATCH_SIZE = 8', 'eval_script.evaluate.num_examples = 16'])
    return capsys.readouterr().out

  lines = [line for line in evaluate().splitlines() if line.startswith('step ')]
  assert [line.split()[1] for line in lines] == ['2', '4']
  metrics = json.loads((tmp_path / 'metrics.json').read_text())
  assert sorted(metrics) == ['2', '4']
  assert set(metrics['4']['sort_digits']) == {'exact_match', 'log_likelihood'}
  assert 0 <= metrics['4']['sort_digits']['exact_match'] <= 100
  assert metrics['4']['sort_digits']['log_likelihood'] < 0
  assert glob.glob(str(tmp_path / 'sort_digits' / 'events.out.tfevents.*'))

  with caplog.at_level(logging.INFO):
    again = evaluate()
  assert 'Step 4 is already in' in caplog.text
  assert not [line for line in again.splitlines() if line.startswith('step ')]


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
