"""Gin bindings that configure nothing the run uses are reported (t5train/gin_report.py).

Most tests parse gin as the binaries do and call small configurables of their own; the real run
files are checked by calling the train and infer configurables up to the start of their bodies,
where the binaries make the first check. One test runs the train binary in strict mode.
"""

import logging
import os

import pytest
from binaries import REPO, SMOKE, run_train

import gin
from t5train import gin_report, gin_utils
from t5train import infer as infer_script
from t5train import train as train_script
from t5train.errors import UserError


@gin.configurable(module='report_test')
def run(model=None, data=None, decode_fn=None, steps=1, log_every=10):
  """A binary's configured function: builds nothing itself, like train."""
  return model, data, decode_fn, steps, log_every


@gin.configurable(module='report_test')
class Config:
  def __init__(self, size=1, pack=True):
    self.size, self.pack = size, pack


@gin.configurable(module='report_test')
def beam(alpha=0.6, penalty=None):
  return alpha, penalty


@gin.configurable(module='report_test')
def sample(temperature=1.0):
  return temperature


@gin.configurable(module='report_test')
def penalty(power=1.0):
  return power


def builds_with_size_itself(size=3):  # a caller that passes a parameter itself
  return gin.get_configurable(Config)(size=size)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()
  gin_report.forget_sources()


@pytest.fixture
def framework_dir(tmp_path, monkeypatch):
  """A folder whose gin files count as t5train's own."""
  directory = tmp_path / 'framework'
  directory.mkdir()
  monkeypatch.setattr(gin_report, 'FRAMEWORK_DIRS', [*gin_report.FRAMEWORK_DIRS, str(directory)])
  return directory


def _write(path, text):
  path.write_text(text)
  return str(path)


def _names(found):
  return sorted(u.name for u in found)


BASE = """
RUN_STEPS = 5
report_test.run:
  model = @model/report_test.Config()
  data = @data/report_test.Config()
  steps = %RUN_STEPS
model/report_test.Config.size = 8
data/report_test.Config.size = 2
"""


def test_scopes_macros_and_callers_decide_what_is_used(tmp_path):
  user = _write(tmp_path / 'user.gin', BASE + """
report_test.Config.pack = False         # unscoped: both calls read it
report_test.Config.size = 4             # every call reads a more specific binding
report_test.sample.temperature = 0.5    # nothing calls sample
other/report_test.Config.size = 1       # no call in scope other/
UNUSED_MACRO = 3
""")
  gin_utils.parse_gin([user], ['report_test.run.log_every = 2', 'RUN_STEPS = 7'])
  gin.get_configurable(run)()
  found = {u.name: u for u in gin_report.unused_bindings()}
  assert sorted(found) == ['UNUSED_MACRO', 'other/report_test.Config.size',
                           'report_test.Config.size', 'report_test.sample.temperature']
  assert all(u.source == gin_report.Source(gin_report.USER_FILE, user) for u in found.values())
  assert found['report_test.Config.size'].reason == (
      'every call reads a more specific binding (data/report_test.Config.size, '
      'model/report_test.Config.size)')
  assert found['other/report_test.Config.size'].reason == (
      'report_test.Config is called only as data/report_test.Config, model/report_test.Config')
  assert found['report_test.sample.temperature'].reason == 'nothing in the run calls report_test.sample'
  assert found['UNUSED_MACRO'].reason == 'no binding that the run uses refers to %UNUSED_MACRO'


def test_a_parameter_that_the_caller_passes_is_unused(tmp_path):
  gin_utils.parse_gin([], ['report_test.Config.size = 4', 'report_test.Config.pack = False'])
  builds_with_size_itself()
  found = gin_report.unused_bindings()
  assert [(u.name, u.source.kind, u.reason) for u in found] == [
      ('report_test.Config.size', gin_report.COMMAND_LINE, 'the code passes size itself')]


def test_a_configurable_passed_uncalled_is_checked_when_the_run_ends(tmp_path, caplog):
  gin_utils.parse_gin([], ['report_test.run.decode_fn = @report_test.beam',
                           'report_test.beam.penalty = @report_test.penalty()',
                           'report_test.penalty.power = 2.0',
                           'report_test.beam.alpha = 0.3', 'report_test.sample.temperature = 0.5',
                           'STRICT_BINDINGS = True'])
  report = gin_report.Report('prog')
  _, _, decode_fn, _, _ = gin.get_configurable(run)()
  # beam (and penalty, which beam's binding calls) may still be called: only sample is named.
  with pytest.raises(UserError) as error:
    report.at_start()
  assert str(error.value) == (
      '1 gin binding configures nothing prog uses: report_test.sample.temperature (command line: '
      'nothing in the run calls report_test.sample). Correct the name or scope, or remove the '
      'binding (STRICT_BINDINGS = True stops a run on them)')
  assert _names(gin_report.unused_bindings()) == [
      'report_test.beam.alpha', 'report_test.beam.penalty', 'report_test.penalty.power',
      'report_test.sample.temperature']
  assert decode_fn() == (0.3, 2.0)  # the run calls it late
  assert _names(gin_report.unused_bindings()) == ['report_test.sample.temperature']
  with caplog.at_level(logging.INFO):
    assert report.at_end() == []  # sample was reported at the start; nothing new


def test_what_stays_uncalled_is_a_warning_at_the_end_even_when_strict(caplog):
  gin_utils.parse_gin([], ['report_test.run.decode_fn = @report_test.beam',
                           'report_test.beam.alpha = 0.3', 'STRICT_BINDINGS = True'])
  report = gin_report.Report('prog')
  gin.get_configurable(run)()
  assert report.at_start() == []
  with caplog.at_level(logging.WARNING):
    assert _names(report.at_end()) == ['report_test.beam.alpha']
  assert ('Gin binding report_test.beam.alpha (command line) configured nothing prog used: '
          'nothing in the run calls report_test.beam.') in caplog.messages


def test_strict_bindings_must_be_a_bool():
  gin_utils.parse_gin([], ['STRICT_BINDINGS = 1'])
  with pytest.raises(UserError, match='STRICT_BINDINGS must be True or False, not 1'):
    gin_report.Report('prog')


def test_t5trains_own_files_and_a_runs_config_gin_are_summarised(tmp_path, framework_dir, caplog):
  framework = _write(framework_dir / 'run.gin', BASE + """
report_test.beam.alpha = 0.6   # optional: used when decode_fn is bound
""")
  user = _write(tmp_path / 'user.gin', f"""
include '{framework}'
report_test.sample.temperature = 0.5
""")
  gin_utils.parse_gin([user], [])
  gin.get_configurable(run)()
  sources = {u.name: u.source.kind for u in gin_report.unused_bindings()}
  assert sources == {'report_test.beam.alpha': gin_report.FRAMEWORK_FILE,
                     'report_test.sample.temperature': gin_report.USER_FILE}
  config_gin = _write(tmp_path / 'config.gin', gin.operative_config_str())
  assert gin_report.is_operative_config(open(config_gin).read())
  assert not gin_report.is_operative_config(open(user).read())

  # Another program given the first one's operative config: its settings are one info line.
  gin.clear_config()
  gin_utils.parse_gin([config_gin], ['report_test.Config.pack = False'])
  gin.get_configurable(sample)()
  report = gin_report.Report('other')
  with caplog.at_level(logging.INFO, logger='absl'):
    assert _names(report.at_start()) == ['report_test.Config.pack']
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings[0] == ('Gin binding report_test.Config.pack (command line) configures nothing '
                         'other uses: nothing in the run calls report_test.Config.')
  assert len(warnings) == 2  # and the hint
  summary, = [r.getMessage() for r in caplog.records if 'operative config' in r.getMessage()]
  assert summary.startswith(f"{config_gin} is a run's operative config; 10 of its bindings "
                            '(data/Config, model/Config, run, RUN_STEPS) configure nothing '
                            'other uses.')


class _Started(Exception):
  """Raised by the check at the start of a binary's function, before it does any work."""


def _start(configured, guard, files, bindings):
  """Parses gin as the binary does and calls ``configured`` up to the first check."""
  gin.clear_config()
  gin_utils.parse_gin(files, bindings, search_paths=[gin_utils.REPO_ROOT])
  report = gin_report.Report(configured.__module__)
  started = {}

  def check():
    started['reported'] = report.at_start()
    started['unused'] = gin_report.unused_bindings()
    started['config'] = gin.operative_config_str()
    raise _Started

  guard.on_enter = check
  try:
    gin.get_configurable(configured)()
  except _Started:
    pass
  finally:
    guard.on_enter = None
  return started


@pytest.fixture(scope='module')
def train_start(tmp_path_factory):
  """The smoke run's start, with a user file and bindings: what it reports, and its config.gin."""
  root = tmp_path_factory.mktemp('train_start')
  # (t5train.decoding stays unregistered: T5X's decoder-only files bind t5x.decoding's names.)
  user = _write(root / 'restore.gin', """
from __gin__ import dynamic_registration
from t5train import checkpoints
checkpoints.RestoreCheckpointConfig.mode = 'latest'  # but restore_checkpoint_cfg is None
""")
  try:
    started = _start(train_script.train, train_script._GUARD,  # pylint: disable=protected-access
                     [f'{REPO}/{f.split("=", 1)[1]}' for f in SMOKE] + [user],
                     [f"MODEL_DIR = '{root}/model'", 'TRAIN_STEPS = 1',
                      'data.DatasetConfig.batch_size = 4',
                      'best_checkpoint.BestCheckpointConfig.patience = 2'])
  finally:
    gin.clear_config()
  started['config_gin'] = _write(root / 'config.gin', started['config'])
  return started


def test_the_smoke_run_reports_only_the_users_unused_bindings(train_start):
  assert _names(train_start['reported']) == [
      'best_checkpoint.BestCheckpointConfig.patience', 'checkpoints.RestoreCheckpointConfig.mode',
      'data.DatasetConfig.batch_size']
  # pretrain.gin's optional best-checkpoint settings are unused too, and not warned about.
  optional = [u for u in train_start['unused'] if u.source.kind == gin_report.FRAMEWORK_FILE]
  assert _names(optional) == ['best_checkpoint.BestCheckpointConfig.mode']


def test_infer_given_a_runs_config_gin_names_only_the_users_bindings(train_start, tmp_path):
  started = _start(infer_script.infer, infer_script._GUARD,  # pylint: disable=protected-access
                   ['gin/runs/infer.gin', train_start['config_gin']],
                   [f"CHECKPOINT_PATH = '{tmp_path}/model'", f"INFER_OUTPUT_DIR = '{tmp_path}'",
                    'TRAIN_STEPS = 3'])
  # TRAIN_STEPS, given again on the command line, is the user's; the rest is config.gin's.
  assert _names(started['reported']) == ['TRAIN_STEPS']
  unused = {u.name: u.source.kind for u in started['unused'] if u.name != 'TRAIN_STEPS'}
  assert set(unused.values()) == {gin_report.OPERATIVE_CONFIG}
  assert {'train_script.train.total_steps', 'MODEL_DIR', 'train/data.DatasetConfig.pack',
          'optimizers.create_learning_rate_scheduler.warmup_steps'} <= set(unused)
  assert not any(name.startswith('MODEL/') for name in unused)  # the model is used


def test_strict_train_binary_exits_2_before_it_starts(tmp_path):
  model_dir = tmp_path / 'model'
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=1',
                     '--gin.STRICT_BINDINGS=True', '--gin.data.DatasetConfig.batch_size=4')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert errors == [
      't5train.train: error: 1 gin binding configures nothing t5train.train uses: '
      'data.DatasetConfig.batch_size (command line: every call reads a more specific binding '
      '(train/data.DatasetConfig.batch_size, train_eval/data.DatasetConfig.batch_size)). Correct '
      'the name or scope, or remove the binding (STRICT_BINDINGS = True stops a run on them)']
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(model_dir)  # stopped before anything was written or compiled
