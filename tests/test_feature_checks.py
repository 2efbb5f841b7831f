"""Tasks a model cannot read (the checks the train binary runs first). A decoder-only run through
the binaries' entry points is in tests/test_run_configs.py."""

import os

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


def _model_with(vocabulary):
  import types  # noqa: PLC0415
  return types.SimpleNamespace(input_vocabulary=vocabulary, output_vocabulary=vocabulary)


def test_a_model_whose_vocabulary_is_not_the_tasks_is_refused():
  """T5X's verify_matching_vocabs: the demo task encodes bytes; a SentencePiece model would
  read its predictions with the wrong vocabulary. The matching vocabulary passes."""
  config = data.DatasetConfig('sort_digits', {'inputs': 8, 'targets': 8})
  data.check_vocabularies(_model_with(seqio.ByteVocabulary()), config)
  spm = seqio.SentencePieceVocabulary(os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'))
  with pytest.raises(UserError, match=r"'sort_digits' encodes inputs with ByteVocabulary of "
                                      r'\d+ ids but the model reads them with '
                                      r'SentencePieceVocabulary\(.*sentencepiece.model\)'):
    data.check_vocabularies(_model_with(spm), config)


def test_a_vocabulary_file_that_cannot_be_read_is_named():
  """T5X's default vocabulary lives in gs://t5-data; unreadable (e.g. offline), the binaries
  stop before compiling with the file's name instead of failing at the first decode."""
  missing = seqio.SentencePieceVocabulary('/nonexistent/vocab/sentencepiece.model')
  with pytest.raises(UserError, match=r"cannot read the model's inputs vocabulary "
                                      r'/nonexistent/vocab/sentencepiece.model: .*'
                                      r'sentencepiece_model_file'):
    data.check_vocabularies(_model_with(missing))
