"""Every numeric setting of the run gin files is checked before anything compiles: zero, a
negative and a wrong-typed value each give a one-line UserError naming the setting, unless the
value is inside the setting's allowed range."""

import glob
import os
import re

import pytest

import gin
from t5train import gin_utils, settings_check
from t5train.errors import UserError

GIN_DIR = os.path.join(gin_utils.REPO_ROOT, 'gin')
REQUIRED = ["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEPS = 10',
            "INITIAL_CHECKPOINT_PATH = '/tmp/unused/checkpoint_1'"]
RUNS = {'pretrain': ['models/t5_1_1/tiny.gin', 'runs/pretrain.gin', 'tasks/demo.gin']}
_NUMBER = r'-?\d+(?:\.\d*)?(?:e-?\d+)?'


def _numeric_macros_in_gin_files():
  """Names of the macros that some gin file of the checkout sets to a number."""
  names = set()
  for path in glob.glob(os.path.join(GIN_DIR, '**', '*.gin'), recursive=True):
    with open(path) as f:
      names |= set(re.findall(rf'^([A-Z][A-Z0-9_]*) = {_NUMBER}\s*(?:#.*)?$', f.read(), re.M))
  return names


def test_every_numeric_macro_of_the_gin_files_has_a_rule():
  numeric = _numeric_macros_in_gin_files()
  assert {'BATCH_SIZE', 'EVAL_PERIOD', 'Z_LOSS', 'NUM_PARTITIONS'} <= numeric  # the regex finds them
  assert numeric - set(settings_check.MACROS) == set()


@pytest.fixture(scope='module')
def parsed():
  """A parsed pretraining run; ``check(binding)`` binds over it, checks, and restores the value."""
  gin.clear_config()
  gin_utils.parse_gin(RUNS['pretrain'], REQUIRED)  # the run's own values pass

  def check(name, value):
    bound, original = settings_check.bound_value(name if '.' in name else f'%{name}')
    with gin.unlock_config():
      gin.parse_config(f'{name} = {value}')
    try:
      settings_check.check_bound_settings()
    finally:
      with gin.unlock_config():
        gin.parse_config(f'{name} = {original!r}' if bound else f'{name} = 1')
  yield check
  gin.clear_config()


SETTINGS = ([(name, rule) for name, rule in settings_check.MACROS.items()
             if name not in ('NOISE_DENSITY', 'MEAN_NOISE_SPAN_LENGTH', 'INFER_EVAL_NUM_EXAMPLES')]
            + list(settings_check.BINDINGS.items()))


@pytest.mark.parametrize('name,rule', SETTINGS, ids=[name for name, _ in SETTINGS])
def test_zero_negative_and_wrong_typed_values_are_refused_by_name(parsed, name, rule):
  for value in ['0', '-1', "'8'", '2.5']:
    if rule.allows(eval(value)):  # noqa: S307  (the literal as gin reads it)
      parsed(name, value)
      continue
    with pytest.raises(UserError) as error:
      parsed(name, value)
    message = str(error.value)
    assert message.startswith(f'{name} must be ') and '\n' not in message, message


def test_span_corruption_and_inference_settings_are_checked_too():
  for name, value in [('NOISE_DENSITY', 1.0), ('NOISE_DENSITY', 0), ('MEAN_NOISE_SPAN_LENGTH', 0.5),
                      ('INFER_EVAL_NUM_EXAMPLES', 0)]:
    with pytest.raises(UserError, match=f'^{name} must be'):
      settings_check.check_value(name, settings_check.MACROS[name], value)
  settings_check.check_value('NOISE_DENSITY', settings_check.MACROS['NOISE_DENSITY'], 0.15)


@pytest.mark.parametrize('lengths,message', [
    ("{'inputs': 0, 'targets': 8}", "TASK_FEATURE_LENGTHS['inputs'] must be an integer >= 1, not 0"),
    ("{'inputs': 32, 'targets': 'x'}", "TASK_FEATURE_LENGTHS['targets'] must be an integer"),
    ('512', 'TASK_FEATURE_LENGTHS must be a dict'),
])
def test_feature_lengths_are_positive_integers(parsed, lengths, message):
  with pytest.raises(UserError, match=re.escape(message)):
    parsed('TASK_FEATURE_LENGTHS', lengths)


def test_rules_read_as_ranges():
  assert settings_check.Rule(int, 1).describe() == 'an integer >= 1'
  assert settings_check.MACROS['DROPOUT_RATE'].describe() == 'a number >= 0 and < 1'
  assert settings_check.MACROS['EVAL_PERIOD'].describe() == 'an integer >= 0 (or None)'
  assert not settings_check.Rule(int, 0).allows(True)  # bool is not a count
  assert not settings_check.Rule(float, 0).allows(float('nan'))
