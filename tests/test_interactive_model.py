"""InteractiveModel: training on a handful of examples, its checkpoints, and agreement with the
train, infer and eval binaries run on configs generated from it."""

import json
import os

import numpy as np
import pytest
from binaries import call_configured, read_params, read_scalars, run_train
from test_notebook_api import QA_PAIRS as QA
from test_notebook_api import build_model

import gin
from t5train import eval as eval_script
from t5train import gin_utils, partitioning, tasks, testing
from t5train import infer as infer_script
from t5train import interactive_model as im_lib


def qa_model(output_dir, **kwargs):
  return im_lib.InteractiveModel(
      batch_size=8, task_feature_lengths={'inputs': 64, 'targets': 16}, output_dir=str(output_dir),
      partitioner=partitioning.PjitPartitioner(num_partitions=1), model=build_model(), **kwargs)


def assert_same_params(a, b):
  # A checkpoint round trip only moves data: bit for bit.
  testing.assert_trees_equal(a.train_state.params, b.train_state.params)


def test_loss_falls_and_a_saved_checkpoint_restores_elsewhere(tmp_path):
  im = qa_model(tmp_path / 'a', checkpoint_period=0)
  with pytest.raises(ValueError, match='At least one batch of data must be provided'):
    im.train_step(QA[:7])
  losses = []
  for _ in range(50):
    im.train_step(QA)
    losses.append(im.train_summary['loss'])
  assert im.step == 50
  assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:10])
  assert not [name for name in os.listdir(tmp_path / 'a') if name.startswith('checkpoint_')]

  im.save_checkpoint()
  restored = qa_model(tmp_path / 'b', checkpoint_path=str(tmp_path / 'a' / 'checkpoint_50'))
  assert restored.step == 50
  assert_same_params(restored, im)
  assert restored.predict_with_aux(QA[:2])[0][0][1] == im.predict_with_aux(QA[:2])[0][0][1]


def test_each_step_checkpoints_and_a_new_model_resumes_from_the_output_dir(tmp_path):
  im = qa_model(tmp_path)
  predictions, scores, metrics = im.train_loop(
      num_steps=2, train_batches=QA, score_batches=[QA[:3]], eval_batches=[QA],
      metrics_fns=[tasks.exact_match, tasks.mean_log_likelihood])
  assert predictions is None
  assert [len(scores), set(metrics)] == [3, {'exact_match', 'log_likelihood'}]
  assert sorted(name for name in os.listdir(tmp_path) if name.startswith('checkpoint_')) == [
      'checkpoint_1', 'checkpoint_2']
  again = qa_model(tmp_path)
  assert again.step == 2
  assert_same_params(again, im)


def test_predictions_scores_metrics_and_a_config_for_each_binary(tmp_path):
  im = qa_model(tmp_path, checkpoint_period=0)
  predicted, aux = im.predict_with_aux(['nq question: who wrote hamlet'] + QA[:2])
  assert len(predicted) == 3 and all(isinstance(text, bytes) for _, text in predicted)
  assert predicted[0][0]['inputs_pretokenized'] == b'nq question: who wrote hamlet'
  assert len(aux['scores']) == 3 and all(score < 0 for score in aux['scores'])
  scores = [score for _, score in im.score(QA[:3])]
  assert len(scores) == 3 and all(score < 0 for score in scores)

  def with_aux(targets, predictions, aux_values):
    return {'examples': len(targets), 'mean_score': float(np.mean(aux_values['scores']))}

  metrics = im.evaluate(QA[:3], [tasks.mean_log_likelihood, with_aux])
  assert metrics['examples'] == 3
  testing.assert_trees_close(metrics['log_likelihood'], np.mean(scores), rtol=testing.SIMPLE_RTOL)
  with pytest.raises(ValueError, match="must take \\('targets', 'predictions'\\)"):
    im.evaluate(QA[:3], [lambda x, y: {}])

  # A config for each binary.
  with pytest.raises(ValueError, match='call save_checkpoint'):
    _write_config(im, im_lib.ScriptType.INFERENCE, tmp_path / 'infer.gin')
  im.save_checkpoint()
  checkpoint = str(tmp_path / 'checkpoint_0')
  expected = {im_lib.ScriptType.PRETRAINING: {'%TRAIN_STEPS': 7},
              im_lib.ScriptType.FINETUNING: {'%INITIAL_CHECKPOINT_PATH': checkpoint},
              im_lib.ScriptType.INFERENCE: {'%CHECKPOINT_PATH': checkpoint},
              im_lib.ScriptType.EVALUATION: {'%CHECKPOINT_PATH': checkpoint}}
  try:
    for script_type, macros in expected.items():
      path = tmp_path / f'{script_type.name}.gin'
      _write_config(im, script_type, path, train_steps=7)
      gin.clear_config()
      gin_utils.parse_gin([str(path)], [])
      assert gin.query_parameter('%BATCH_SIZE') == 8
      assert gin.query_parameter('%TASK_FEATURE_LENGTHS') == {'inputs': 64, 'targets': 16}
      for name, value in macros.items():
        assert gin.query_parameter(name) == value, (script_type, name)
  finally:
    gin.clear_config()


def _tiny_model():
  gin.clear_config()
  gin_utils.parse_gin(['gin/models/t5_1_1/tiny.gin'], [], search_paths=[gin_utils.REPO_ROOT])
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  gin.clear_config()
  return model


def _write_config(im, script_type, path, **kwargs):
  text = im_lib.get_gin_config_from_interactive_model(
      im, script_type, task_name='sort_digits',
      partitioner_config_str='partitioning.PjitPartitioner.num_partitions = 1',
      # A binding of the model's class, as the notebook writes it (models is imported for it).
      model_config_str='models.EncoderDecoderModel.label_smoothing = %LABEL_SMOOTHING',
      imports_str="include 'models/t5_1_1/tiny.gin'", **kwargs)
  path.write_text(text)
  return f'--gin_file={path}'


def test_generated_configs_reproduce_it_in_the_binaries(tmp_path):
  im = im_lib.InteractiveModel(
      batch_size=8, task_feature_lengths={'inputs': 16, 'targets': 16},
      output_dir=str(tmp_path / 'im'), partitioner=partitioning.PjitPartitioner(num_partitions=1),
      model=_tiny_model(), checkpoint_period=0)
  # The train binary reads the task unshuffled with the seed of RANDOM_SEED (the model's seed).
  batches = im_lib.get_batches_from_seqio('sort_digits', 'train', batch_size=8, num_batches=3,
                                          shuffle=False, seed=42)
  losses = []
  for batch in batches:
    im.train_step(batch)
    losses.append(im.train_summary['loss'])
  im.save_checkpoint()

  train_config = _write_config(im, im_lib.ScriptType.PRETRAINING, tmp_path / 'pretrain.gin',
                               train_steps=3)
  binary_dir = tmp_path / 'binary'
  trained = run_train(train_config, f"--gin.MODEL_DIR='{binary_dir}'", '--gin.SUMMARY_PERIOD=1',
                      '--gin.EVAL_PERIOD=0')
  assert trained.returncode == 0, trained.stderr[-3000:]
  # Here and below: a whole model's results from two programs (this one and a binary), each
  # compiled on its own, so composite: not guaranteed to reduce in the same order.
  testing.assert_trees_close(np.asarray([loss for _, loss in read_scalars(binary_dir / 'train')['loss']]),
                             np.asarray(losses))
  ours, theirs = read_params(tmp_path / 'im' / 'checkpoint_3'), read_params(binary_dir / 'checkpoint_3')
  testing.assert_trees_close(theirs, ours)

  validation = im_lib.get_batches_from_seqio('sort_digits', 'validation', batch_size=8,
                                             num_batches=2, shuffle=False)
  # infer and eval: their gin functions in this process, as the binaries call them.
  _write_config(im, im_lib.ScriptType.INFERENCE, tmp_path / 'infer.gin')
  call_configured(infer_script.infer, [tmp_path / 'infer.gin'],
                  ["infer_script.infer.mode = 'predict_with_aux'",
                   'infer_script.infer.num_examples = 8'])
  with open(tmp_path / 'im' / 'inference' / 'sort_digits-predict_with_aux.jsonl') as f:
    records = [json.loads(line) for line in f]
  predicted, aux = im.predict_with_aux(validation[0])
  assert [r['inputs'] for r in records] == [ex['input'].decode() for ex in validation[0]]
  assert [r['prediction'] for r in records] == [text.decode() for _, text in predicted]
  testing.assert_trees_close(np.asarray([r['aux']['scores'] for r in records]),
                             np.asarray(aux['scores']))

  _write_config(im, im_lib.ScriptType.EVALUATION, tmp_path / 'eval.gin')
  call_configured(eval_script.evaluate, [tmp_path / 'eval.gin'],
                  ['eval_script.evaluate.num_examples = 16'])
  with open(tmp_path / 'im' / 'eval' / 'metrics.json') as f:
    binary_metrics = json.load(f)['3']['sort_digits']
  metrics = im.evaluate([ex for batch in validation for ex in batch],
                        [tasks.exact_match, tasks.mean_log_likelihood])
  assert binary_metrics['exact_match'] == metrics['exact_match']
  testing.assert_trees_close(binary_metrics['log_likelihood'], metrics['log_likelihood'])


def test_a_decoder_only_model_trains_predicts_and_scores(tmp_path):
  """A prefix LM through the notebook API: the same calls as for the encoder-decoder."""
  import seqio  # noqa: PLC0415

  from t5train import models, optimizers  # noqa: PLC0415
  from t5train.decoder_only_network import DecoderOnlyTransformer  # noqa: PLC0415
  config = testing.tiny_config(vocab_size=384, emb_dim=32, num_heads=4, num_encoder_layers=0)
  model = models.DecoderOnlyModel(DecoderOnlyTransformer(config), seqio.ByteVocabulary(),
                                  optimizers.Adafactor(), inputs_bidirectional_attention=True)
  im = im_lib.InteractiveModel(
      batch_size=8, task_feature_lengths={'inputs': 64, 'targets': 16}, output_dir=str(tmp_path),
      partitioner=partitioning.PjitPartitioner(num_partitions=1), model=model,
      checkpoint_period=0)
  losses = []
  for _ in range(50):
    im.train_step(QA)
    losses.append(im.train_summary['loss'])
  assert losses[-1] < 0.95 * losses[0] and losses[-1] < min(losses[:10])
  predicted, aux = im.predict_with_aux(QA[:3])
  assert len(predicted) == 3 and all(isinstance(text, bytes) for _, text in predicted)
  assert all(score < 0 for score in aux['scores'])
  scores = [score for _, score in im.score(QA[:3])]
  assert len(scores) == 3 and all(score < 0 for score in scores)


_TRAIN_ONE_STEP_AND_EXIT = """
import sys
sys.path.insert(0, sys.argv[2])
from test_notebook_api import QA_PAIRS, build_model
from t5train import interactive_model, partitioning
im = interactive_model.InteractiveModel(
    batch_size=8, task_feature_lengths={'inputs': 64, 'targets': 16}, output_dir=sys.argv[1],
    partitioner=partitioning.PjitPartitioner(num_partitions=1), model=build_model())
im.train_step(QA_PAIRS)
"""


def test_a_script_ending_right_after_a_step_keeps_its_checkpoint(tmp_path):
  # train_step saves in the background; the save must finish at interpreter exit.
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, '-c', _TRAIN_ONE_STEP_AND_EXIT, str(tmp_path), os.path.dirname(__file__)],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'cannot schedule new futures' not in result.stderr
  names = sorted(name for name in os.listdir(tmp_path) if name.startswith('checkpoint_'))
  assert names == ['checkpoint_1'], names
  assert os.path.isdir(tmp_path / 'checkpoint_1' / 'state')
