"""LoRA through the binaries: finetune_lora.gin trains adapters on a base checkpoint and saves only
them; infer decodes the adapted model unmerged, and the merged weights decode the same."""

import json

import pytest
from binaries import run_binary, run_train

import gin
from t5train import (
  checkpoint_reading,
  checkpoints,
  convert,
  gin_utils,
  interactive_model,
  partitioning,
  testing,
)

LENGTHS = {'inputs': 32, 'targets': 32}  # gin/tasks/demo.gin's
NUM_EXAMPLES = 16


def _gin_model(*files):
  gin.clear_config()
  try:
    gin_utils.parse_gin(list(files), [], search_paths=[gin_utils.REPO_ROOT])
    return gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A tiny base checkpoint, then three LoRA steps on it by the train binary with a learning rate
  that moves the adapters well away from zero."""
  root = tmp_path_factory.mktemp('lora')
  plain = _gin_model('gin/models/t5_1_1/tiny.gin')
  base = checkpoints.save_params(str(root / 'base'),
                                 testing.tiny_trainer(plain).train_state.params, 0)
  model_dir = str(root / 'run')
  result = run_train('--gin_file=gin/models/t5_1_1/tiny.gin', '--gin_file=gin/runs/finetune_lora.gin',
                     '--gin_file=gin/tasks/demo.gin', f"--gin.INITIAL_CHECKPOINT_PATH='{base}'",
                     f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=3', '--gin.EVAL_PERIOD=0',
                     '--gin.optimizers.create_learning_rate_scheduler.base_learning_rate=0.05')
  assert result.returncode == 0, result.stderr[-3000:]
  return base, f'{model_dir}/checkpoint_3', plain


def test_lora_checkpoints_hold_the_adapters_and_name_the_base(lora_run):
  base, checkpoint, _ = lora_run
  saved = checkpoint_reading.saved_tree(checkpoint_reading.item_dir(checkpoint))['params']
  names = [name for name, _ in checkpoint_reading.flatten_with_names(saved)]
  assert names and all(name.endswith(('/lora_a', '/lora_b')) for name in names)
  assert checkpoint_reading.base_checkpoint(checkpoint) == base


def test_infer_unmerged_and_merged_decode_the_same(lora_run, tmp_path):
  _, checkpoint, plain = lora_run
  result = run_binary('t5train.infer', '--gin_file=gin/models/t5_1_1/tiny.gin',
                      '--gin_file=gin/models/lora.gin', '--gin_file=gin/runs/infer.gin',
                      '--gin_file=gin/tasks/demo.gin', f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                      f"--gin.INFER_OUTPUT_DIR='{tmp_path}'", '--gin.BATCH_SIZE=8',
                      f'--gin.infer_script.infer.num_examples={NUM_EXAMPLES}',
                      '--gin.infer_script.infer.include_tokens=True')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'sort_digits-predict.jsonl') as f:
    unmerged = [json.loads(line) for line in f]
  assert len(unmerged) == NUM_EXAMPLES

  adapted = _gin_model('gin/models/t5_1_1/tiny.gin', 'gin/models/lora.gin')
  merged_dir = convert.export_merged(checkpoint, adapted.module.config, str(tmp_path / 'merged'))
  inputs = [record['inputs'] for record in unmerged]
  predictions = {}
  for name, model, path in (('merged', plain, merged_dir), ('unmerged', adapted, checkpoint)):
    im = interactive_model.InteractiveModel(
        batch_size=8, task_feature_lengths=LENGTHS, output_dir=str(tmp_path / f'im_{name}'),
        partitioner=partitioning.PjitPartitioner(num_partitions=1), model=model,
        checkpoint_path=path, checkpoint_period=0)
    predictions[name] = [text.decode() for _, text in im.predict_with_aux(inputs)[0]]
  base_im = interactive_model.InteractiveModel(
      batch_size=8, task_feature_lengths=LENGTHS, output_dir=str(tmp_path / 'im_base'),
      partitioner=partitioning.PjitPartitioner(num_partitions=1), model=plain,
      checkpoint_path=lora_run[0], checkpoint_period=0)
  base_predictions = [text.decode() for _, text in base_im.predict_with_aux(inputs)[0]]

  assert predictions['merged'] == [record['prediction'] for record in unmerged]
  assert predictions['unmerged'] == predictions['merged']
  assert base_predictions != predictions['merged']  # the adapters change what is decoded
