"""Watching runs: experiment trackers (W&B offline, MLflow on a local file store) beside TensorBoard,
a resumed run continuing its tracker runs, jax.profiler traces of chosen steps and batches, the text
summary of predictions, memory figures, and the plot binary.

One tiny run is trained (2 steps, then resumed for a third) through the train binary's gin
function in this process, with every writer on; the tests read back what each tracker wrote and
compare it with TensorBoard's events. Nothing reaches the network.
"""

import glob
import json
import os
import struct

import numpy as np
import pytest
from binaries import call_configured, read_scalars, read_texts

from t5train import eval as eval_script
from t5train import infer as infer_script
from t5train import multihost, plot, prediction_summaries, profiling, summaries, trackers
from t5train import train as train_script
from t5train.errors import UserError

TINY = ['gin/models/t5_1_1/tiny.gin', 'gin/runs/pretrain.gin', 'gin/tasks/demo.gin']
TASK = 'sort_digits'
NUM_INFER_EVAL_EXAMPLES = 4
OFFLINE = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_ERROR_REPORTING': 'false',
           'WANDB_DISABLE_CODE': 'true', 'MLFLOW_ALLOW_FILE_STORE': 'true',
           'MLFLOW_DISABLE_TELEMETRY': 'true', 'DO_NOT_TRACK': 'true'}


def _bindings(model_dir, steps):
  return [f"MODEL_DIR = '{model_dir}'", f'TRAIN_STEPS = {steps}', 'BATCH_SIZE = 8',
          'SUMMARY_PERIOD = 1', 'EVAL_PERIOD = 2', 'EVAL_STEPS = 1', 'CHECKPOINT_PERIOD = 2',
          "METRIC_WRITERS = ['tensorboard', 'wandb', 'mlflow']", 'PROFILE_STEPS = (2, 2)',
          'train_script.train.infer_eval_dataset_cfg = @train_eval/data.DatasetConfig()',
          f'train_script.train.infer_eval_num_examples = {NUM_INFER_EVAL_EXAMPLES}']


@pytest.fixture(scope='module')
def offline_trackers(tmp_path_factory):
  """W&B offline and MLflow on a local file store, for this module's tests only."""
  store = tmp_path_factory.mktemp('mlruns')
  env = {**OFFLINE, 'MLFLOW_TRACKING_URI': f'file:{store}'}
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  yield store
  for name, value in saved.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


@pytest.fixture(scope='module')
def tracked_run(offline_trackers, tmp_path_factory):
  """MODEL_DIR of a run trained to step 2 with every writer, then resumed to step 3; with the
  tracker run ids recorded after the first part."""
  model_dir = tmp_path_factory.mktemp('experiments') / 'lr3'
  call_configured(train_script.train, TINY, _bindings(model_dir, 2))
  with open(model_dir / trackers.TRACKERS_FILE) as f:
    first_ids = json.load(f)
  call_configured(train_script.train, TINY, _bindings(model_dir, 3))
  return model_dir, first_ids


def _wandb_records(path):
  """The records of a W&B run file (``run-<id>.wandb``): LevelDB's log format (32 KiB blocks,
  records of a 7-byte header: CRC, length, type) after W&B's 7-byte file header."""
  from wandb.proto import wandb_internal_pb2  # noqa: PLC0415
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  position, pending = 7, b''
  while position + 7 <= len(data):
    left = 32768 - position % 32768
    if left < 7:
      position += left
      continue
    _, length, kind = struct.unpack('<IHB', data[position:position + 7])
    if length == 0 and kind == 0:  # padding up to the block's end
      position += left
      continue
    chunk = data[position + 7:position + 7 + length]
    position += 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record


def _wandb_runs(model_dir):
  """[(run record, {step: {key: value}}, config {key: value})] of each offline W&B run segment."""
  runs = []
  for path in sorted(glob.glob(f'{model_dir}/wandb/offline-run-*/run-*.wandb')):
    run, history, config = None, {}, {}
    for record in _wandb_records(path):
      kind = record.WhichOneof('record_type')
      if kind == 'run':
        run = record.run
        config.update({item.key: json.loads(item.value_json) for item in run.config.update})
      elif kind == 'config':
        config.update({item.key: json.loads(item.value_json) for item in record.config.update})
      elif kind == 'history':
        items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                 for item in record.history.item}
        history.setdefault(int(items['_step']), {}).update(items)
    runs.append((run, history, config))
  return runs


def _mlflow_client(store):
  from mlflow.tracking import MlflowClient  # noqa: PLC0415
  return MlflowClient(tracking_uri=f'file:{store}')


def test_trackers_get_the_scalars_tensorboard_gets_at_the_same_steps(tracked_run, offline_trackers):
  model_dir, _ = tracked_run
  ids = json.loads((model_dir / trackers.TRACKERS_FILE).read_text())
  tensorboard = {f'train/{tag}': values for tag, values in read_scalars(model_dir / 'train').items()}
  tensorboard.update({f'training_eval/{TASK}/{tag}': values for tag, values in
                      read_scalars(model_dir / 'training_eval' / TASK).items()})
  # seqio's logger tags inference metrics eval/<metric> in TensorBoard; trackers name them as the
  # run's results and best-checkpoint metrics do: inference_eval/<task>/<metric>.
  tensorboard.update({f'inference_eval/{TASK}/{tag[len("eval/"):]}': values for tag, values in
                      read_scalars(model_dir / 'inference_eval' / TASK).items()})
  compared = ['train/loss', 'train/accuracy', 'train/learning_rate', 'train/memory/host_peak_rss_gib',
              f'training_eval/{TASK}/loss', f'inference_eval/{TASK}/exact_match']
  assert [step for step, _ in tensorboard['train/loss']] == [1, 2, 3]

  wandb_history = {}
  for _, history, _ in _wandb_runs(model_dir):
    for step, items in history.items():
      wandb_history.setdefault(step, {}).update(items)
  client = _mlflow_client(offline_trackers)
  for key in compared:
    expected = tensorboard[key]
    assert expected, key
    from_wandb = [(step, wandb_history[step][key]) for step, _ in expected]
    np.testing.assert_allclose([v for _, v in from_wandb], [v for _, v in expected], rtol=1e-6)
    # A file store cannot hold learning_rate beside learning_rate/current: there '/' is '.'.
    history = client.get_metric_history(ids['mlflow']['run_id'], key.replace('/', '.'))
    logged = sorted((m.step, m.value) for m in history)
    assert [step for step, _ in logged] == [step for step, _ in expected], key
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)


def test_trackers_get_the_config_model_size_and_names_from_model_dir(tracked_run, offline_trackers):
  model_dir, _ = tracked_run
  group = model_dir.parent.name
  runs = _wandb_runs(model_dir)
  run, _, config = runs[-1]
  assert (run.display_name, run.run_group, run.job_type) == ('lr3', group, 'train')
  assert config['model/num_parameters'] > 0
  assert config['TRAIN_STEPS'] == '3'  # the resumed part's settings (gin's text of each value)
  assert any(key.endswith('train.total_steps') for key in config)

  ids = json.loads((model_dir / trackers.TRACKERS_FILE).read_text())
  client = _mlflow_client(offline_trackers)
  mlflow_run = client.get_run(ids['mlflow']['run_id'])
  assert mlflow_run.info.run_name == 'lr3'
  assert client.get_experiment(mlflow_run.info.experiment_id).name == group
  assert mlflow_run.data.params['model.num_parameters'] == str(config['model/num_parameters'])
  assert mlflow_run.data.params['TRAIN_STEPS'] == '2'  # MLflow keeps a param's first value
  artifacts = [a.path for a in client.list_artifacts(mlflow_run.info.run_id, 'texts/train/config')]
  assert artifacts, 'the gin config text'


def test_a_resumed_run_continues_the_same_tracker_runs(tracked_run, offline_trackers):
  model_dir, first_ids = tracked_run
  ids = json.loads((model_dir / trackers.TRACKERS_FILE).read_text())
  assert ids['wandb']['run_id'] == first_ids['wandb']['run_id']
  assert ids['mlflow']['run_id'] == first_ids['mlflow']['run_id']
  runs = _wandb_runs(model_dir)
  assert len(runs) == 2  # one offline segment per job, both of the same W&B run
  assert {run.run_id for run, _, _ in runs} == {ids['wandb']['run_id']}
  assert max(runs[0][1]) == 2 and 3 in runs[1][1]

  client = _mlflow_client(offline_trackers)
  experiment = client.get_experiment_by_name(model_dir.parent.name)
  assert len(client.search_runs([experiment.experiment_id])) == 1
  steps = [m.step for m in client.get_metric_history(ids['mlflow']['run_id'], 'train.loss')]
  assert sorted(steps) == [1, 2, 3]
  assert client.get_run(ids['mlflow']['run_id']).info.status == 'FINISHED'


def test_profile_steps_write_a_trace_of_those_steps(tracked_run):
  model_dir, _ = tracked_run
  # PROFILE_STEPS = (2, 2): traced in the first part only (the resumed part starts at step 3).
  traces = glob.glob(f'{model_dir}/plugins/profile/*/*.xplane.pb')
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  perfetto = glob.glob(f'{model_dir}/plugins/profile/*/perfetto_trace.json.gz')
  assert perfetto and os.path.getsize(perfetto[0]) > 0


def test_inference_eval_writes_a_text_summary_of_its_predictions(tracked_run, offline_trackers):
  model_dir, _ = tracked_run
  texts = read_texts(model_dir / 'inference_eval' / TASK)[prediction_summaries.TAG]
  assert [step for step, _ in texts] == [2, 3]
  step, table = texts[-1]
  lines = table.splitlines()
  assert lines[0].startswith('| input | target | prediction | exact_match')
  assert len(lines) == 2 + NUM_INFER_EVAL_EXAMPLES
  with open(model_dir / 'inference_eval' / f'{TASK}-{step:06}.jsonl') as f:
    written = [json.loads(line) for line in f][:NUM_INFER_EVAL_EXAMPLES]
  for line, record in zip(lines[2:], written):
    cells = [cell.strip() for cell in line.strip('|').split(' | ')]
    assert cells[1:3] == [record['target'], record['prediction']]
    assert float(cells[3]) == (100.0 if record['target'] == record['prediction'] else 0.0)
  # The trackers get it too.
  wandb_keys = {key for _, history, _ in _wandb_runs(model_dir) for items in history.values()
                for key in items}
  assert f'inference_eval/{TASK}/predictions/_type' in wandb_keys
  ids = json.loads((model_dir / trackers.TRACKERS_FILE).read_text())
  artifacts = _mlflow_client(offline_trackers).list_artifacts(
      ids['mlflow']['run_id'], f'texts/inference_eval/{TASK}/predictions')
  assert [a.path.rsplit('/', 1)[-1] for a in artifacts] == ['step_00000002.md', 'step_00000003.md']


def test_eval_binary_sends_metrics_and_predictions_to_its_own_tracker_run(tracked_run,
                                                                          offline_trackers, tmp_path):
  model_dir, _ = tracked_run
  output_dir = tmp_path / 'eval'
  results = call_configured(
      eval_script.evaluate, ['gin/runs/eval.gin', model_dir / 'config.gin'],
      [f"CHECKPOINT_PATH = '{model_dir}/checkpoint_2'", f"EVAL_OUTPUT_DIR = '{output_dir}'",
       f'eval_script.evaluate.num_examples = {NUM_INFER_EVAL_EXAMPLES}', 'BATCH_SIZE = 8',
       "METRIC_WRITERS = ['mlflow']"])
  assert read_texts(output_dir / TASK)[prediction_summaries.TAG][0][0] == 2
  client = _mlflow_client(offline_trackers)
  run = client.get_run(json.loads((output_dir / trackers.TRACKERS_FILE).read_text())['mlflow']['run_id'])
  assert run.info.run_name == 'lr3-eval' and run.data.tags['t5train.job'] == 'eval'
  assert client.get_experiment(run.info.experiment_id).name == model_dir.parent.name
  assert run.data.metrics[f'eval.{TASK}.exact_match'] == pytest.approx(
      results['2'][TASK]['exact_match'])


def test_infer_profiles_the_chosen_batches(tracked_run, tmp_path):
  model_dir, _ = tracked_run
  output_dir = tmp_path / 'infer'
  call_configured(infer_script.infer, ['gin/runs/infer.gin', model_dir / 'config.gin'],
                  [f"CHECKPOINT_PATH = '{model_dir}/checkpoint_2'", f"INFER_OUTPUT_DIR = '{output_dir}'",
                   'infer_script.infer.num_examples = 16', 'BATCH_SIZE = 8',
                   'PROFILE_BATCHES = (2, 2)'])
  assert len(glob.glob(f'{output_dir}/plugins/profile/*/*.xplane.pb')) == 1
  assert len((output_dir / f'{TASK}-predict.jsonl').read_text().splitlines()) == 16


def test_naming_a_tracker_that_is_not_installed_stops_before_anything_is_built(monkeypatch,
                                                                                tmp_path):
  real_find_spec = trackers.importlib.util.find_spec
  monkeypatch.setattr(trackers.importlib.util, 'find_spec',
                      lambda name: None if name == 'wandb' else real_find_spec(name))
  model_dir = tmp_path / 'run'
  with pytest.raises(UserError, match=r"the wandb package is not installed: pip install 't5train\[wandb\]'"):
    call_configured(train_script.train, TINY,
                    [f"MODEL_DIR = '{model_dir}'", 'TRAIN_STEPS = 1', "METRIC_WRITERS = ['wandb']"])
  assert not model_dir.exists()
  with pytest.raises(UserError, match='not a metric writer; choose from tensorboard, wandb, mlflow'):
    trackers.check_metric_writers(['tensorboard', 'comet'])
  assert trackers.check_metric_writers('TensorBoard') == ()


def test_only_the_primary_process_opens_trackers(monkeypatch, tmp_path):
  monkeypatch.setattr(multihost, 'is_primary', lambda: False)
  identity = trackers.RunIdentity.of(str(tmp_path / 'group' / 'run'), 'train')
  with trackers.open_trackers(('wandb', 'mlflow'), identity, str(tmp_path)) as writer:
    assert writer is None
  assert not (tmp_path / 'group' / 'run' / trackers.TRACKERS_FILE).exists()


def test_run_names_and_ranges_are_read_from_settings():
  identity = trackers.RunIdentity.of('gs://bucket/sweeps/lr3', 'eval', directory='/tmp/x')
  assert (identity.name, identity.group, identity.tracker_run_name()) == ('lr3', 'sweeps', 'lr3-eval')
  assert profiling.parse_range((100, 105), 'PROFILE_STEPS') == (100, 105)
  for bad in ((5, 4), (0, 1), 7, ('a', 'b')):
    with pytest.raises(UserError, match='PROFILE_STEPS'):
      profiling.parse_range(bad, 'PROFILE_STEPS')


def _png_size(path):
  with open(path, 'rb') as f:
    header = f.read(24)
  assert header[:8] == b'\x89PNG\r\n\x1a\n' and header[12:16] == b'IHDR'
  return struct.unpack('>II', header[16:24])


def test_plot_draws_several_runs_into_a_png(tracked_run, tmp_path):
  model_dir, _ = tracked_run
  other = tmp_path / 'baseline'
  (other / 'train').mkdir(parents=True)
  from t5train import metrics  # noqa: PLC0415
  writer = metrics.SummaryWriter(str(other / 'train'))
  writer.write_scalars(1, {'loss': 3.0})
  writer.write_scalars(3, {'loss': 2.0})
  writer.close()
  output = tmp_path / 'runs.png'
  size = plot.plot_runs([str(model_dir), str(other)], str(output),
                        ['train/loss', 'training_eval/*/loss'], ['step', 'time'])
  assert _png_size(output) == size and size[0] > size[1] > 0
  with pytest.raises(UserError, match='no run has a scalar matching train/nothing'):
    plot.plot_runs([str(model_dir)], str(tmp_path / 'x.png'), ['train/nothing'])


def test_plot_without_matplotlib_names_the_pip_line(monkeypatch, tmp_path):
  import sys  # noqa: PLC0415
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  with pytest.raises(UserError, match=r"pip install 't5train\[plot\]'"):
    plot.plot_runs([str(tmp_path)], str(tmp_path / 'x.png'))


def test_gin_bindings_give_macros_by_value():
  import gin  # noqa: PLC0415
  gin.clear_config()
  try:
    gin.parse_config('from __gin__ import dynamic_registration\n'
                     'from t5train import profiling\n'
                     'NAME = "PROFILE_STEPS"\n'
                     'profiling.parse_range.setting = %NAME\n'
                     'profiling.parse_range.value = (1, 2)\n')
    assert gin.get_configurable(profiling.parse_range)() == (1, 2)
    bindings = summaries.gin_bindings()
  finally:
    gin.clear_config()
  assert bindings['NAME'] == "'PROFILE_STEPS'"
  assert bindings['t5train.profiling.parse_range.setting'] == "'PROFILE_STEPS'"
  assert bindings['t5train.profiling.parse_range.value'] == '(1, 2)'
