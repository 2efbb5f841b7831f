"""Tasks a model cannot read (the checks the train binary runs first). A decoder-only run through
the binaries' entry points is in tests/test_run_configs.py."""

import pytest
import seqio

from t5train import data, tasks  # noqa: F401  (tasks registers sort_digits)
from t5train.errors import UserError


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
