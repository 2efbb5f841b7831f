"""Decoder-only models through the binaries, and tasks a model cannot read."""

import json
import math
import os

import pytest
import seqio
from binaries import run_binary, run_train

from t5train import data, tasks  # noqa: F401  (tasks registers sort_digits)
from t5train.errors import UserError

DECODER_ONLY = ['--gin_file=gin/models/decoder_only/tiny.gin', '--gin_file=gin/runs/pretrain.gin',
                '--gin_file=gin/tasks/demo.gin']


@pytest.fixture(scope='module')
def prefix_lm_run(tmp_path_factory):
  """The CI smoke command with the decoder-only tiny model: a prefix LM on the demo task, with
  teacher-forced and seqio (decoding and scoring) evaluation during training."""
  model_dir = str(tmp_path_factory.mktemp('decoder_only'))
  result = run_train(*DECODER_ONLY, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=2',
                     '--gin.EVAL_PERIOD=2', '--gin.EVAL_STEPS=1', '--gin.BATCH_SIZE=8',
                     '--gin.train_script.train.infer_eval_dataset_cfg='
                     '@train_eval/data.DatasetConfig()',
                     '--gin.train_script.train.infer_eval_num_examples=4')
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


def test_trains_and_evaluates_with_decoding_and_scoring(prefix_lm_run):
  assert os.path.isdir(os.path.join(prefix_lm_run, 'checkpoint_2'))
  with open(os.path.join(prefix_lm_run, 'inference_eval', 'sort_digits-metrics.jsonl')) as f:
    metrics = json.loads(f.readline())
  assert metrics['step'] == 2
  assert set(metrics) >= {'exact_match', 'log_likelihood'}
  assert math.isfinite(metrics['log_likelihood']) and metrics['log_likelihood'] < 0
  with open(os.path.join(prefix_lm_run, 'model-info.txt')) as f:
    info = f.read()
  assert 'decoder/token_embedder/embedding' in info and 'encoder/' not in info


def test_infer_scores_with_a_decoder_only_checkpoint(prefix_lm_run, tmp_path):
  result = run_binary('t5train.infer', '--gin_file=gin/models/decoder_only/tiny.gin',
                      '--gin_file=gin/runs/infer.gin', '--gin_file=gin/tasks/demo.gin',
                      f"--gin.CHECKPOINT_PATH='{prefix_lm_run}'",
                      f"--gin.INFER_OUTPUT_DIR='{tmp_path}'", "--gin.infer_script.infer.mode='score'",
                      '--gin.infer_script.infer.num_examples=3')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'sort_digits-score.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 3
  assert all(math.isfinite(r['score']) and r['score'] < 0 and r['targets'] for r in records)


def test_a_converter_that_drops_the_inputs_is_refused():
  """The check the train binary runs first (exit 2 on its UserError): seqio.LMFeatureConverter
  (a causal LM) on the demo task, whose inputs it would drop."""
  config = data.DatasetConfig('sort_digits', {'inputs': 8, 'targets': 8})
  with pytest.raises(UserError) as e:
    data.check_features(config, seqio.LMFeatureConverter)
  assert "seqio.LMFeatureConverter reads ['targets'] and 'sort_digits' has" in str(e.value)
  assert "'inputs' would be dropped; use seqio.DecoderFeatureConverter" in str(e.value)


@pytest.fixture(scope='module')
def targets_only_task():
  name = 'test_targets_only_digits'
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(tasks.sort_digits_dataset, splits=('train',)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={'targets': seqio.Feature(seqio.ByteVocabulary(), add_eos=True)})
  return name


@pytest.mark.parametrize('converter, lengths, message', [
    (seqio.EncDecFeatureConverter, {'inputs': 8, 'targets': 8},
     "without ['inputs']: a targets-only task trains a decoder-only model"),
    (seqio.DecoderFeatureConverter, {'inputs': 8, 'targets': 8}, "without ['inputs']"),
], ids=['encoder_decoder', 'prefix_lm_lengths'])
def test_a_model_that_needs_inputs_on_a_targets_only_task(targets_only_task, converter, lengths,
                                                          message):
  config = data.DatasetConfig(targets_only_task, lengths)
  with pytest.raises(UserError, match=r'reads \[.*\] and .test_targets_only_digits. has') as e:
    data.check_features(config, converter)
  assert message in str(e.value)
  data.check_features(data.DatasetConfig(targets_only_task, {'targets': 8}),
                      seqio.DecoderFeatureConverter)  # a causal LM reads it


def test_causal_lm_lengths_on_a_task_with_inputs():
  config = data.DatasetConfig('sort_digits', {'targets': 8})
  with pytest.raises(UserError, match="give TASK_FEATURE_LENGTHS an 'inputs' length"):
    data.check_features(config, seqio.DecoderFeatureConverter)
  data.check_features(data.DatasetConfig('sort_digits', {'inputs': 8, 'targets': 8}),
                      seqio.DecoderFeatureConverter)
