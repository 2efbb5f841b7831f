"""The train binary end to end, in a subprocess, on tiny.gin and the built-in task."""

import os

import jax
import pytest
from binaries import SMOKE, read_scalars, read_texts, run_train

from t5train import quiet_start

EXPECTED_SCALARS = {
    'loss', 'accuracy', 'cross_ent_loss', 'z_loss', 'learning_rate', 'timing/steps_per_second',
    'timing/seqs_per_second', 'timing/target_tokens_per_second',
    'non_padding_fraction/loss_weights', 'timing/data_secs_per_step',
    'timing/checkpoint_secs_per_step', 'timing/evaluation_secs_per_step',
    'timing/compute_secs_per_step',
    # the rest of T5X's
    'loss_per_all_target_tokens', 'loss_per_nonpadding_target_token',
    'cross_ent_loss_per_all_target_tokens', 'z_loss_per_all_target_tokens',
    'effective_batch_size/encoder', 'effective_batch_size/decoder',
    'non_padding_fraction/encoder', 'non_padding_fraction/decoder', 'non_padding_fraction/overall',
    'learning_rate/current', 'timing/seconds', 'timing/seqs', 'timing/seqs_per_second_per_core',
    'timing/target_tokens_per_second_per_core', 'timing/uptime', 'timing/compilation_seconds',
    'timing/train_iter_warmup', 'timing/checkpoint_seconds', 'timing/evaluate_seconds'}


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp('smoke'))
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=8',
                     '--gin.SUMMARY_PERIOD=4', '--gin.CHECKPOINT_PERIOD=4', '--gin.EVAL_PERIOD=3',
                     '--gin.EVAL_STEPS=2')
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir, result


def test_writes_the_model_directory(smoke_run):
  model_dir, _ = smoke_run
  assert sorted(os.listdir(model_dir)) == ['checkpoint_4', 'checkpoint_8', 'config.gin',
                                           'model-info.txt', 'train', 'training_eval']
  info = open(os.path.join(model_dir, 'model-info.txt')).read()
  assert 'encoder/layers_0/mlp/wi_0/kernel' in info and "('embed', 'mlp')" in info
  assert 'Total parameters: 518,240' in info  # T5X tiny: 32128 x 8 embedding + untied logits
  config = open(os.path.join(model_dir, 'config.gin')).read()
  assert "MODEL_DIR = '" in config and 'TRAIN_STEPS = 8' in config


def test_the_console_shows_no_tensorflow_start_up_notes(smoke_run):
  """On this CPU-only machine TensorFlow notes the missing CUDA driver at start-up unless
  t5train.quiet_start filters it (tests/test_quiet_start.py checks the filter itself)."""
  _, result = smoke_run
  noise = [line for line in result.stderr.splitlines() if quiet_start.STARTUP_NOISE.search(line)]
  assert not noise, noise


def test_summaries_hold_t5x_scalars(smoke_run):
  model_dir, _ = smoke_run
  scalars = read_scalars(os.path.join(model_dir, 'train'))
  assert EXPECTED_SCALARS <= set(scalars), sorted(scalars)
  assert [step for step, _ in scalars['loss']] == [4, 8]
  assert all(0.0 <= value <= 1.0 for _, value in scalars['accuracy'])
  last = {tag: values[-1][1] for tag, values in scalars.items()}
  # T5X's definitions: tokens of the window's steps, rates over the window's seconds.
  assert last['timing/seqs'] == 4 * 32  # SUMMARY_PERIOD steps of demo.gin's BATCH_SIZE rows
  assert last['timing/seqs_per_second'] == pytest.approx(last['timing/seqs'] /
                                                         last['timing/seconds'], rel=1e-4)
  assert last['timing/seqs_per_second_per_core'] == pytest.approx(
      last['timing/seqs_per_second'] / jax.device_count(), rel=1e-4)
  assert last['loss_per_all_target_tokens'] == pytest.approx(
      last['loss_per_nonpadding_target_token'] * last['non_padding_fraction/loss_weights'],
      rel=1e-4)
  assert [step for step, _ in scalars['timing/compilation_seconds']] == [0]
  assert [step for step, _ in scalars['timing/checkpoint_seconds']] == [4, 8]
  # The operative gin config as TensorBoard text, as T5X writes it.
  texts = read_texts(os.path.join(model_dir, 'train'))
  assert [step for step, _ in texts['config']] == [0]
  assert 'TRAIN_STEPS = 8' in texts['config'][0][1]


def test_teacher_forced_eval_runs_on_its_own_period(smoke_run):
  model_dir, result = smoke_run
  scalars = read_scalars(os.path.join(model_dir, 'training_eval', 'sort_digits'))
  assert [step for step, _ in scalars['loss']] == [3, 6, 8]  # and at the last step
  assert {'accuracy', 'cross_ent_loss', 'z_loss', 'loss_per_all_target_tokens',
          'loss_per_nonpadding_target_token', 'z_loss_per_all_target_tokens',
          'cross_ent_loss_per_all_target_tokens', 'timing/seqs_per_second',
          'timing/steps_per_second', 'timing/seconds'} <= set(scalars)
  assert 'step 6  training_eval/sort_digits: accuracy' in result.stderr


def test_progress_lines_are_printed(smoke_run):
  _, result = smoke_run
  lines = [line for line in result.stderr.splitlines() if 'step 8/8' in line]
  assert lines and all(word in lines[-1] for word in ('loss', 'accuracy', 'steps/s', 'tokens/s',
                                                     'eta'))


def test_rerun_resumes_and_config_is_rerunnable(smoke_run, tmp_path):
  model_dir, _ = smoke_run
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=10',
                     '--gin.SUMMARY_PERIOD=4', '--gin.CHECKPOINT_PERIOD=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from' in result.stderr and 'checkpoint_8' in result.stderr
  assert 'Training steps 9 to 10' in result.stderr
  assert os.path.isdir(os.path.join(model_dir, 'checkpoint_10'))
  steps = [s for s, _ in read_scalars(os.path.join(model_dir, 'train'))['loss']]
  assert steps == [4, 8, 10]

  # The written config.gin reproduces the run on its own.
  other_dir = str(tmp_path / 'from_config')
  result = run_train(f'--gin_file={model_dir}/config.gin', f"--gin.MODEL_DIR='{other_dir}'",
                     '--gin.TRAIN_STEPS=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(os.path.join(other_dir, 'checkpoint_2'))


def test_finetune_starts_from_an_initial_checkpoint(smoke_run, tmp_path):
  model_dir, _ = smoke_run
  finetune = ['--gin_file=gin/models/t5_1_1/tiny.gin', '--gin_file=gin/runs/finetune.gin',
              '--gin_file=gin/tasks/demo.gin', f"--gin.MODEL_DIR='{tmp_path}'",
              '--gin.TRAIN_STEPS=9', '--gin.INFER_EVAL_NUM_EXAMPLES=16', '--gin.EVAL_STEPS=2']
  result = run_train(*finetune, f"--gin.INITIAL_CHECKPOINT_PATH='{model_dir}/checkpoint_8'")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Initialising from {model_dir}/checkpoint_8' in result.stderr
  assert 'Training steps 9 to 9' in result.stderr  # the step count continues, as in T5X
  assert os.path.isdir(tmp_path / 'checkpoint_9')
  # Fine-tuning evaluates the task's seqio metrics on held-out examples at the end.
  assert 'step 9  inference_eval/sort_digits: exact_match' in result.stderr
  metrics = (tmp_path / 'inference_eval' / 'sort_digits-metrics.jsonl').read_text()
  assert '"step": 9' in metrics and 'exact_match' in metrics
  assert len((tmp_path / 'inference_eval' / 'sort_digits-000009.jsonl').read_text().splitlines()) == 16

  missing = run_train(*finetune[:3], f"--gin.MODEL_DIR='{tmp_path / 'other'}'",
                      '--gin.TRAIN_STEPS=9', f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/nope'")
  assert missing.returncode == 2, missing.stderr[-3000:]
  assert 'does not exist' in missing.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('args,message', [
    (SMOKE + ["--gin.MODEL_DIR='/tmp/t5train_bad'", '--gin.no_such_fn.x=1'], 'no_such_fn'),
    (SMOKE + ['--gin.TRAIN_STEPS=2'], 'MODEL_DIR'),
    (['--gin_file=gin/models/t5_1_1/no_such_model.gin'] + SMOKE[1:] +
     ["--gin.MODEL_DIR='/tmp/t5train_bad'"], 'no_such_model.gin'),
    (SMOKE + ["--gin.MODEL_DIR='/tmp/t5train_bad'", '--gin.TRAIN_STEPS=2',
              "--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], 'no_such_task'),
    pytest.param(SMOKE + ["--gin.MODEL_DIR='/tmp/t5train_bad'", '--gin.TRAIN_STEPS=2',
                          "--gin.network.T5Config.attention_implementation='cudnn'"],
                 'needs an NVIDIA GPU',
                 marks=pytest.mark.skipif(jax.default_backend() == 'gpu', reason='has a GPU')),
    (SMOKE + ["--gin.MODEL_DIR='/tmp/t5train_bad'", '--gin.TRAIN_STEPS=2',
              "--gin.TASK_FEATURE_LENGTHS={'inputs': -3, 'targets': 8}"],
     "TASK_FEATURE_LENGTHS['inputs'] must be an integer >= 1, not -3"),
    (SMOKE + ['--gin_file=gin/models/prompt_tuning.gin', "--gin.MODEL_DIR='/tmp/t5train_bad'",
              '--gin.TRAIN_STEPS=2'], 'the examples cannot be packed'),
], ids=['unknown_configurable', 'missing_required_macro', 'missing_gin_file', 'unknown_task',
        'cudnn_attention_without_a_gpu', 'negative_feature_length', 'packed_prompt_tuning'])
def test_bad_input_exits_2_with_a_short_message(args, message):
  result = run_train(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('t5train.train: error:') and message in last, last
  assert 'Traceback' not in result.stderr
  assert not os.path.exists('/tmp/t5train_bad/checkpoint_2')


USER_TASK_MODULE = """
import seqio
from t5train import tasks

seqio.TaskRegistry.add(
    'user_sort_digits',
    source=seqio.FunctionDataSource(tasks.sort_digits_dataset, splits=('train', 'validation')),
    preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    output_features={name: seqio.Feature(seqio.ByteVocabulary(), add_eos=True)
                     for name in ('inputs', 'targets')})
"""


def test_search_paths_and_a_user_task_module(tmp_path):
  extra = tmp_path / 'configs'
  extra.mkdir()
  (extra / 'short.gin').write_text('TRAIN_STEPS = 1\nMIXTURE_OR_TASK_MODULE = "user_tasks"\n')
  (tmp_path / 'user_tasks.py').write_text(USER_TASK_MODULE)
  # Run from another directory: the SMOKE paths resolve through the repository search path,
  # short.gin through --gin_search_paths, and the task module from the working directory.
  env_path = os.environ.get('PYTHONPATH', '')
  os.environ['PYTHONPATH'] = f'{tmp_path}:{env_path}'
  try:
    result = run_train(*SMOKE, f'--gin_search_paths={extra}', '--gin_file=short.gin',
                       "--gin.MIXTURE_OR_TASK_NAME='user_sort_digits'",
                       f"--gin_bindings=MODEL_DIR = '{tmp_path / 'run'}'", cwd=str(tmp_path))
  finally:
    os.environ['PYTHONPATH'] = env_path
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'run' / 'checkpoint_1')


def test_indivisible_microbatches_exit_2(tmp_path):
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{tmp_path}'", '--gin.TRAIN_STEPS=1',
                     '--gin.train_script.train.num_microbatches=5')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'num_microbatches=5' in result.stderr.strip().splitlines()[-1]
