"""T5X's flags and values: --multiprocess_gpu, --initialization_timeout, --tfds_data_dir,
--seqio_additional_cache_dirs, infer's --shard_id / --num_shards, RANDOM_SEED = None,
TASK_FEATURE_LENGTHS = None and USE_CACHED_TASKS = True.

The binaries' gin functions are called in this process (gin parsed as the binaries parse it);
one train binary launch checks the flags and RANDOM_SEED = None end to end.
"""

import json
import os
import re

import pytest
from absl import flags
from absl.testing import flagsaver
from binaries import run_train

import gin
from t5train import checkpoints, convert, gin_utils, multihost, testing
from t5train import eval as eval_script
from t5train import infer as infer_script
from t5train.errors import UserError

TINY = 'gin/models/t5_1_1/tiny.gin'
DEMO = 'gin/tasks/demo.gin'
NUM_EXAMPLES = 5


def _call(configured, gin_files, bindings, **arguments):
  """Parses gin as the binaries do, then calls ``configured`` with what gin binds to it."""
  gin.clear_config()
  try:
    gin_utils.parse_gin(gin_files, bindings, search_paths=[gin_utils.REPO_ROOT])
    return gin.get_configurable(configured)(**arguments)
  finally:
    gin.clear_config()


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A checkpoint of the tiny model with fresh parameters (what infer and eval read)."""
  gin.clear_config()
  try:
    model = convert.gin_model([TINY, DEMO], search_paths=[gin_utils.REPO_ROOT])
  finally:
    gin.clear_config()
  params = testing.tiny_trainer(model).train_state.params
  return checkpoints.save_params(str(tmp_path_factory.mktemp('tiny')), params, step=1)


# --- flags ---------------------------------------------------------------------------------------

def test_t5x_flags_parse_and_do_what_they_do_in_t5x(tmp_path, monkeypatch):
  import seqio  # noqa: PLC0415
  joined = {}
  monkeypatch.setattr(multihost, 'initialize',
                      lambda *args, **kwargs: joined.update(args=args, **kwargs))
  monkeypatch.setattr(multihost, 'is_primary', lambda: True)
  cache_dirs = seqio.get_global_cache_dirs()
  tfds_dir = str(tmp_path / 'tfds')
  try:
    with flagsaver.flagsaver():
      gin_utils.parse_flags(['prog', '--multiprocess_gpu', '--coordinator_address=10.0.0.2:1234',
                             '--process_count=2', '--process_index=1',
                             '--initialization_timeout=7', f'--tfds_data_dir={tfds_dir}',
                             f'--seqio_additional_cache_dirs={tmp_path}/a,{tmp_path}/b',
                             '--shard_id=1', '--num_shards=3'])
      gin_utils.initialize_multiprocess_from_flags()
      gin_utils.apply_data_flags()
      assert gin_utils.shard_arguments('t5train.infer') == {'shard_id': 1, 'num_shards': 3}
      with pytest.raises(UserError, match='--shard_id and --num_shards are flags of t5train.infer'):
        gin_utils.shard_arguments('t5train.train')
    assert joined['args'] == ('10.0.0.2:1234', 2, 1) and joined['initialization_timeout'] == 7
    assert seqio.utils._TFDS_DATA_DIR_OVERRIDE == tfds_dir  # pylint: disable=protected-access
    assert {f'{tmp_path}/a', f'{tmp_path}/b'} <= set(seqio.get_global_cache_dirs())

    with flagsaver.flagsaver():  # the coordinator flags without --multiprocess(_gpu)
      gin_utils.parse_flags(['prog', '--initialization_timeout=7'])
      with pytest.raises(UserError, match='need --multiprocess'):
        gin_utils.initialize_multiprocess_from_flags()
  finally:
    seqio.set_tfds_data_dir_override(None)
    seqio.set_global_cache_dirs(cache_dirs)
  assert flags.FLAGS.shard_id is None


# --- values --------------------------------------------------------------------------------------

@gin.configurable('seeded_run')
def _seeded_run(random_seed=0):
  return gin_utils.resolve_random_seed(random_seed, 'seeded_run')


@pytest.mark.parametrize('config', [
    'RANDOM_SEED = None\nseeded_run.random_seed = %RANDOM_SEED',
    'seeded_run.random_seed = None'])
def test_a_random_seed_of_none_is_drawn_and_recorded_in_the_operative_config(config):
  gin.clear_config()
  try:
    gin.parse_config(config)
    gin.finalize()
    seed = _seeded_run()
    assert isinstance(seed, int) and 0 <= seed < 2**31
    operative = gin.operative_config_str().splitlines()
  finally:
    gin.clear_config()
  macro = 'RANDOM_SEED' in config
  assert (f'RANDOM_SEED = {seed}' if macro else f'seeded_run.random_seed = {seed}') in operative
  assert ('seeded_run.random_seed = %RANDOM_SEED' in operative) == macro


def test_use_cached_tasks_needs_the_task_in_a_seqio_cache(tmp_path):
  import seqio  # noqa: PLC0415

  from t5train import data  # noqa: PLC0415
  config = data.DatasetConfig('sort_digits', {'inputs': 32, 'targets': 32}, split='validation',
                              use_cached=True)
  with pytest.raises(UserError, match=r"task 'sort_digits' is not cached.*USE_CACHED_TASKS"):
    data.task_for(config)
  (tmp_path / 'sort_digits').mkdir()
  (tmp_path / 'sort_digits' / 'COMPLETED').write_text('')
  cache_dirs = seqio.get_global_cache_dirs()
  task = seqio.get_mixture_or_task('sort_digits')
  try:
    seqio.add_global_cache_dirs([str(tmp_path)])  # what --seqio_additional_cache_dirs does
    data.task_for(config)
  finally:
    seqio.set_global_cache_dirs(cache_dirs)
    task._cache_dir = None  # pylint: disable=protected-access


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def test_infer_shards_write_t5x_files_whose_union_is_the_unsharded_output(checkpoint, tmp_path):
  """Also TASK_FEATURE_LENGTHS = None: every shard measures the same lengths."""
  out = tmp_path / 'out'
  gin_files = [TINY, 'gin/runs/infer.gin', DEMO]
  bindings = [f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{out}'",
              'TASK_FEATURE_LENGTHS = None', f'infer_script.infer.num_examples = {NUM_EXAMPLES}']
  [whole] = _call(infer_script.infer, gin_files, bindings)
  assert os.path.basename(whole) == 'sort_digits-predict.jsonl'
  # Shard 0 through gin (T5X's infer.shard_id), shard 1 as --shard_id/--num_shards pass it.
  [first] = _call(infer_script.infer, gin_files, [*bindings, 'infer_script.infer.shard_id = 0',
                                                   'infer_script.infer.num_shards = 2'])
  [second] = _call(infer_script.infer, gin_files, bindings, shard_id=1, num_shards=2)
  assert os.path.basename(first) == 'sort_digits-predict.jsonl-00000-of-00002'
  assert os.path.basename(second) == 'sort_digits-predict.jsonl-00001-of-00002'
  shards = _lines(first) + _lines(second)
  assert len(_lines(first)) == 3 and len(shards) == NUM_EXAMPLES
  assert sorted(shards) == sorted(_lines(whole))
  # A finished shard is skipped on a rerun; a shard outside the range is refused.
  mtime = os.path.getmtime(second)
  assert _call(infer_script.infer, gin_files, bindings, shard_id=1, num_shards=2) == [second]
  assert os.path.getmtime(second) == mtime
  with pytest.raises(UserError, match=r'shard_id must be in \[0, num_shards\)'):
    _call(infer_script.infer, gin_files, bindings, shard_id=2, num_shards=2)


def test_eval_measures_the_feature_lengths_when_they_are_none(checkpoint, tmp_path):
  from t5train import data  # noqa: PLC0415
  config = data.DatasetConfig('sort_digits', None, split='validation')
  examples = data.pretokenized_examples(config, 4)
  expected = {name: max(len(ex[name]) for ex in examples) for name in ('inputs', 'targets')}
  assert data.max_feature_lengths(config, 4) == expected
  with pytest.raises(UserError, match='TASK_FEATURE_LENGTHS = None .* is for eval and infer'):
    data.check_features(config, object)

  results = _call(eval_script.evaluate, [TINY, 'gin/runs/eval.gin', DEMO],
                  [f"CHECKPOINT_PATH = '{checkpoint}'", f"EVAL_OUTPUT_DIR = '{tmp_path}/eval'",
                   'TASK_FEATURE_LENGTHS = None', 'eval_script.evaluate.num_examples = 4'])
  assert list(results) == ['1'] and results['1']['sort_digits']
  with open(tmp_path / 'eval' / 'metrics.json') as f:
    assert list(json.load(f)) == ['1']


# --- one launch of the train binary ----------------------------------------------------------------

def test_train_binary_draws_and_records_a_seed_with_t5x_flags(tmp_path):
  model_dir = tmp_path / 'run'
  result = run_train(
      f'--gin_file={TINY}', '--gin_file=gin/runs/pretrain.gin', f'--gin_file={DEMO}',
      f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=1', '--gin.BATCH_SIZE=4',
      '--gin.RANDOM_SEED=None', '--gin.EVAL_PERIOD=None',
      f'--seqio_additional_cache_dirs={tmp_path}/cache', f'--tfds_data_dir={tmp_path}/tfds',
      cwd=gin_utils.REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  drawn = re.search(r'RANDOM_SEED is None: drew the random seed (\d+)', result.stderr)
  assert drawn, result.stderr[-3000:]
  config = (model_dir / 'config.gin').read_text()
  assert f'RANDOM_SEED = {drawn.group(1)}' in config.splitlines()
  assert (model_dir / 'checkpoint_1').is_dir()
