"""Every run kind decodes and evaluates through its own config.gin, the documented way:

    t5train.infer --gin_file=gin/runs/infer.gin --gin_file=MODEL_DIR/config.gin --gin.CHECKPOINT_PATH=...

A fine-tune's config.gin says how the run started (RestoreCheckpointConfig bound to
INITIAL_CHECKPOINT_PATH, an assignment map that leaves adapters fresh); that must not change which
checkpoint infer and eval read. The binaries' entry points are called in this process (gin parsed
as the binaries parse it) so that ten decodes cost ten compilations, not ten process start-ups.
"""

import json
import os

import pytest

import gin
from t5train import eval as eval_script
from t5train import gin_utils
from t5train import infer as infer_script
from t5train import train as train_script

TINY = 'gin/models/t5_1_1/tiny.gin'
DECODER_ONLY_TINY = 'gin/models/decoder_only/tiny.gin'
RUN_KINDS = {  # kind: (model gin file, run gin file, fine-tuned from the pretrained run)
    'pretrain': (TINY, 'gin/runs/pretrain.gin', False),
    'finetune': (TINY, 'gin/runs/finetune.gin', True),
    'finetune_lora': (TINY, 'gin/runs/finetune_lora.gin', True),
    'finetune_prompt': (TINY, 'gin/runs/finetune_prompt.gin', True),
    'decoder_only': (DECODER_ONLY_TINY, 'gin/runs/pretrain.gin', False),
}
BEST = ['train_script.train.best_checkpoint_cfg = @best_checkpoint.BestCheckpointConfig()',
        "best_checkpoint.BestCheckpointConfig.metric = 'training_eval/sort_digits/loss'"]
NUM_EXAMPLES = 4


def _call(configured, gin_files, bindings):
  """Parses gin as the binaries do, then calls ``configured`` with what gin binds to it."""
  gin.clear_config()
  try:
    gin_utils.parse_gin(gin_files, bindings, search_paths=[gin_utils.REPO_ROOT])
    return gin.get_configurable(configured)()
  finally:
    gin.clear_config()


def _train(model_dir, kind, initial_checkpoint):
  model_file, run_file, _ = RUN_KINDS[kind]
  steps = 2
  bindings = [f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 4', 'EVAL_PERIOD = 1', 'EVAL_STEPS = 1',
              'CHECKPOINT_PERIOD = 1', 'train_script.train.infer_eval_dataset_cfg = None', *BEST]
  if initial_checkpoint:
    bindings.append(f"INITIAL_CHECKPOINT_PATH = '{initial_checkpoint}'")
    steps += 2  # TRAIN_STEPS counts from the initial checkpoint's step
  bindings.append(f'TRAIN_STEPS = {steps}')
  _call(train_script.train, [model_file, run_file, 'gin/tasks/demo.gin'], bindings)
  return f'{model_dir}/checkpoint_{steps}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A short run of every kind, with checkpoints every step and MODEL_DIR/best."""
  root = tmp_path_factory.mktemp('run_kinds')
  pretrained = _train(root / 'pretrain', 'pretrain', None)
  made = {'pretrain': (str(root / 'pretrain'), pretrained)}
  for kind, (_, _, finetuned) in RUN_KINDS.items():
    if kind != 'pretrain':
      made[kind] = (str(root / kind), _train(root / kind, kind, pretrained if finetuned else None))
  return made


@pytest.mark.parametrize('kind', list(RUN_KINDS))
def test_a_run_decodes_and_evaluates_through_its_config_gin(runs, kind, tmp_path):
  model_dir, checkpoint = runs[kind]
  config = f'{model_dir}/config.gin'
  assert os.path.isdir(f'{model_dir}/best')

  written = _call(infer_script.infer, ['gin/runs/infer.gin', config],
                  [f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{tmp_path}/infer'",
                   f'infer_script.infer.num_examples = {NUM_EXAMPLES}'])
  with open(written[0]) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == NUM_EXAMPLES and all('prediction' in r for r in records)

  results = _call(eval_script.evaluate, ['gin/runs/eval.gin', config],
                  [f"CHECKPOINT_PATH = '{model_dir}/best'", f"EVAL_OUTPUT_DIR = '{tmp_path}/eval'",
                   f'eval_script.evaluate.num_examples = {NUM_EXAMPLES}'])
  with open(f'{model_dir}/best/best.json') as f:
    best_step = json.load(f)['step']
  assert list(results) == [str(best_step)]
  assert 'sort_digits' in results[str(best_step)]


def test_the_runs_start_settings_are_reported_not_applied(runs):
  """infer reads its own scoped RestoreCheckpointConfig and names what config.gin bound instead."""
  model_dir, checkpoint = runs['finetune_lora']
  gin.clear_config()
  try:
    gin_utils.parse_gin(['gin/runs/infer.gin', f'{model_dir}/config.gin'],
                        [f"CHECKPOINT_PATH = '{checkpoint}'", "INFER_OUTPUT_DIR = '/unused'"],
                        search_paths=[gin_utils.REPO_ROOT])
    overridden = gin_utils.log_overridden_bindings(
        'checkpoints.RestoreCheckpointConfig', infer_script.checkpoints.RestoreCheckpointConfig,
        'infer', 't5train.infer')
  finally:
    gin.clear_config()
  assert [line.split(' = ')[0] for line in overridden] == ['path', 'mode', 'assignment_map']
  assert '%INITIAL_CHECKPOINT_PATH (used: %CHECKPOINT_PATH)' in overridden[0]
