"""The binaries on users' files: span-corruption pretraining, fine-tuning on pairs, bad records."""

import json
import os

import numpy as np
import pytest
import seqio

import gin
from tests.binaries import read_scalars, run_binary, run_train

TINY = '--gin_file=gin/models/t5_1_1/tiny.gin'
# The small SentencePiece model that seqio ships for its own tests, with T5's 100 sentinels.
SPM = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                   'sentencepiece.model')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Text documents (English prose from Python's own documentation) and a vocab.gin."""
  from pydoc_data import topics
  root = tmp_path_factory.mktemp('corpus')
  documents = [' '.join(topics.topics[name].split()) for name in sorted(topics.topics)]
  (root / 'train.txt').write_text('\n'.join(documents[:60]) + '\n')
  (root / 'validation.jsonl').write_text(
      '\n'.join(json.dumps({'text': d, 'id': n}) for n, d in enumerate(documents[60:])) + '\n')
  (root / 'vocab.gin').write_text(
      'from __gin__ import dynamic_registration\nimport seqio\n'
      'VOCABULARY = @seqio.SentencePieceVocabulary()\n'
      f"seqio.SentencePieceVocabulary.sentencepiece_model_file = '{SPM}'\n"
      'seqio.SentencePieceVocabulary.extra_ids = 100\n')
  return root


def _span_corruption(corpus, model_dir, steps):
  return run_train(TINY, '--gin_file=gin/runs/pretrain.gin',
                   '--gin_file=gin/tasks/span_corruption.gin', f'--gin_file={corpus}/vocab.gin',
                   f"--gin.TRAIN_FILES='{corpus}/train.txt'",
                   f"--gin.VALIDATION_FILES=['{corpus}/validation.jsonl']",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                   '--gin.BATCH_SIZE=4', f"--gin.MODEL_DIR='{model_dir}'",
                   f'--gin.TRAIN_STEPS={steps}', '--gin.SUMMARY_PERIOD=1',
                   '--gin.CHECKPOINT_PERIOD=3', '--gin.EVAL_PERIOD=3', '--gin.EVAL_STEPS=1')


def test_span_corruption_pretraining_resumes_and_exports_to_hugging_face(corpus, tmp_path):
  # The resumed data equal the uninterrupted ones: tests/test_file_tasks.py checks the readers'
  # saved positions; here the binary saves and restores them.
  for steps in (3, 6):
    result = _span_corruption(corpus, tmp_path, steps)
    assert result.returncode == 0, result.stderr[-3000:]
  assert 'the data continue where checkpoint_3 left off' in result.stderr
  assert [step for step, _ in read_scalars(str(tmp_path / 'train'))['loss']] == list(range(1, 7))
  # VALIDATION_FILES (JSONL) feed the teacher-forced evaluation at steps 3 and 6.
  evaluated = read_scalars(str(tmp_path / 'training_eval' / 'span_corruption'))['loss']
  assert [step for step, _ in evaluated] == [3, 6]
  _exports_score_as_t5train(corpus, tmp_path)


def _exports_score_as_t5train(corpus, model_dir):
  """convert --to=hf takes the model directory and its model from config.gin (found there, or
  named), or from the model and vocabulary gin files; transformers then scores as t5train does."""
  exports = {
      'found': [],
      'config.gin': [f'--gin_file={model_dir}/config.gin'],
      'model files': [TINY, f'--gin_file={corpus}/vocab.gin'],
  }
  # The command with no gin file through the binary; the other two through its function.
  result = run_binary('t5train.convert', '--to=hf', f'--input={model_dir}',
                      f"--output={model_dir / 'hf' / 'found'}")
  assert result.returncode == 0, result.stderr[-2000:]
  from t5train import checkpoint_reading, convert, hf_interop
  for name, gin_files in list(exports.items())[1:]:
    try:
      convert.convert(target='hf', input_path=str(model_dir), output=str(model_dir / 'hf' / name),
                      gin_files=[f.split('=', 1)[1] for f in gin_files],
                      search_paths=[convert.gin_utils.REPO_ROOT])
    finally:
      gin.clear_config()
  weights = {name: (model_dir / 'hf' / name / 'model.safetensors').read_bytes() for name in exports}
  assert len(set(weights.values())) == 1

  checkpoint = f'{model_dir}/checkpoint_6'
  model = convert.gin_model([f'{model_dir}/config.gin'])
  params = hf_interop.nest(convert.read_checkpoint_params(checkpoint, model.module.config))
  vocabulary = model.output_vocabulary
  pair = {'inputs': 'Python has classes.', 'targets': 'A class has methods.'}
  example = {k: np.asarray(vocabulary.encode(v) + [1]) for k, v in pair.items()}
  features = model.example_features(example, {'inputs': 32, 'targets': 32})
  ours = float(model.score_batch(params, {k: v[None] for k, v in features.items()})[0])
  assert checkpoint_reading.find_checkpoints(str(model_dir))[-1][1] == checkpoint

  import torch
  import transformers
  exported = str(model_dir / 'hf' / 'found')
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(exported).eval()
  inputs = tokenizer(pair['inputs'], return_tensors='pt').input_ids
  labels = tokenizer(pair['targets'], return_tensors='pt').input_ids
  assert inputs[0].tolist() == example['inputs'].tolist()
  with torch.no_grad():
    loss = hf(input_ids=inputs, labels=labels).loss
  assert -float(loss) * labels.shape[1] == pytest.approx(ours, rel=1e-5)


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  root = tmp_path_factory.mktemp('pairs')
  rng = np.random.default_rng(0)
  digits = [''.join(map(str, rng.integers(0, 10, rng.integers(4, 9)))) for _ in range(1616)]
  lines = [f'{d}\t{"".join(sorted(d))}' for d in digits]
  (root / 'train.tsv').write_text('\n'.join(lines[:1600]) + '\n')
  (root / 'dev.tsv').write_text('\n'.join(lines[1600:]) + '\n')
  # Line 1,601 is not UTF-8: read some 70 steps in (seqio's shuffle buffer holds 1,000 examples).
  (root / 'late_bad.tsv').write_bytes(('\n'.join(lines[:1600]) + '\n').encode() + b'\xff\tx\n')
  return root


def _files_task(pairs, model_dir, train_file='train.tsv', *extra):
  return run_train(TINY, '--gin_file=gin/runs/pretrain.gin', '--gin_file=gin/tasks/files.gin',
                   f"--gin.TRAIN_FILES='{pairs}/{train_file}'",
                   f"--gin.VALIDATION_FILES='{pairs}/dev.tsv'",
                   "--gin.METRICS=['exact_match', 'f1']",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
                   '--gin.BATCH_SIZE=8', f"--gin.MODEL_DIR='{model_dir}'",
                   '--gin.CHECKPOINT_PERIOD=4', '--gin.EVAL_PERIOD=100', *extra)


def test_pairs_skip_bad_records_and_evaluate_with_metrics_by_name(pairs, tmp_path):
  model_dir = tmp_path / 'model'
  result = _files_task(pairs, model_dir, 'late_bad.tsv', '--gin.TRAIN_STEPS=120',
                       '--gin.SKIP_BAD_RECORDS=True', '--gin.SUMMARY_PERIOD=60',
                       '--gin.CHECKPOINT_PERIOD=1000')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Skipped a bad record' in result.stderr and 'late_bad.tsv:1601' in result.stderr
  skipped = read_scalars(str(model_dir / 'train'))['data/skipped_records/train']
  assert skipped[-1][0] == 120 and skipped[-1][1] >= 1  # once per pass over the file
  result = run_binary('t5train.eval', '--gin_file=gin/runs/eval.gin',
                      f'--gin_file={model_dir}/config.gin', f"--gin.CHECKPOINT_PATH='{model_dir}'",
                      f"--gin.EVAL_OUTPUT_DIR='{tmp_path}/eval'")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert {'exact_match', 'f1'} <= set(json.dumps(metrics).replace('"', ' ').split())


def test_a_bad_record_mid_run_exits_2_and_keeps_the_checkpoints(pairs, tmp_path):
  result = _files_task(pairs, tmp_path, 'late_bad.tsv', '--gin.TRAIN_STEPS=120',
                       '--gin.CHECKPOINT_PERIOD=25')
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('t5train.train: error:') and 'late_bad.tsv:1601: not UTF-8' in last
  saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('checkpoint_'))
  assert saved and all(name.split('_')[1].isdigit() for name in saved)  # committed ones only
