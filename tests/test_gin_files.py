"""Every gin file in gin/ parses, and the model files give the published sizes."""

import glob
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

import gin
from t5train import gin_utils, models, partitioning

GIN_DIR = os.path.join(gin_utils.REPO_ROOT, 'gin')
SEQIO_SPM = os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece',
                         'sentencepiece.model')
REQUIRED = ["MODEL_DIR = '/tmp/unused'", 'TRAIN_STEPS = 1',
            "INITIAL_CHECKPOINT_PATH = '/tmp/unused/checkpoint_1'",
            "CHECKPOINT_PATH = '/tmp/unused'", "INFER_OUTPUT_DIR = '/tmp/unused'",
            "EVAL_OUTPUT_DIR = '/tmp/unused'",
            f"SENTENCEPIECE_MODEL = '{SEQIO_SPM}'"]
# Parameter counts of the released T5 1.1 checkpoints (embedding and logits untied).
T5_1_1_SIZES = {'small': 76_961_152, 'base': 247_577_856, 'large': 783_150_080,
                'xl': 2_849_757_184, 'xxl': 11_135_332_352, 'tiny': 518_240}


def _parse(*files, bindings=()):
  gin.clear_config()
  gin_utils.parse_gin(files, [*REQUIRED, *bindings])


def _num_params(model: models.BaseTransformerModel) -> int:
  shapes = {name: (1, 8) for name in ('encoder_input_tokens', 'decoder_input_tokens',
                                      'decoder_target_tokens')}
  variables = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes),
                             jax.random.PRNGKey(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(variables)))


def _all_gin_files():
  return sorted(os.path.relpath(p, gin_utils.REPO_ROOT)
                for p in glob.glob(os.path.join(GIN_DIR, '**', '*.gin'), recursive=True))


@pytest.mark.parametrize('path', _all_gin_files())
def test_every_gin_file_parses_in_a_full_configuration(path):
  is_size_file = '/models/' in path and not path.endswith(('base_architecture.gin', 'lora.gin',
                                                                 'prompt_tuning.gin'))
  model_file = path if is_size_file else 'gin/models/t5_1_1/tiny.gin'
  run_file = path if '/runs/' in path else 'gin/runs/pretrain.gin'
  files = [model_file, run_file, 'gin/tasks/demo.gin']
  if path not in files:
    files.append(path)
  _parse(*files)
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  kind = models.DecoderOnlyModel if '/decoder_only/' in path else models.EncoderDecoderModel
  assert isinstance(model, kind)
  if path in ('gin/runs/infer.gin', 'gin/runs/eval.gin'):
    binary = 'infer_script.infer' if 'infer' in path else 'eval_script.evaluate'
    config = gin.query_parameter(f'{binary}.dataset_cfg').scoped_configurable_fn()
    assert (config.mixture_or_task_name, config.split, config.shuffle) == (
        'sort_digits', 'validation', False)


@pytest.mark.parametrize('size,expected', sorted(T5_1_1_SIZES.items()))
def test_t5_1_1_sizes(size, expected):
  _parse(f'gin/models/t5_1_1/{size}.gin', 'gin/runs/pretrain.gin', 'gin/tasks/demo.gin')
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  assert _num_params(model) == expected


# Decoder-only presets: vocab * emb (tied logits) + layers * (4 * emb * heads * head_dim
# + 3 * emb * mlp + 2 * emb) + emb + 32 * heads, from the dimensions of T5X's decoder_only gin
# files (whose header comments, e.g. 134,307,072 for base, do not match those dimensions).
DECODER_ONLY_SIZES = {'tiny': 258_728, 'small': 35_332_800, 'base': 109_628_544,
                      'large': 341_231_104, 'xl': 1_223_527_424, 'xxl': 4_762_310_656}


@pytest.mark.parametrize('size,expected', sorted(DECODER_ONLY_SIZES.items()))
def test_decoder_only_sizes(size, expected):
  _parse(f'gin/models/decoder_only/{size}.gin', 'gin/runs/pretrain.gin', 'gin/tasks/demo.gin')
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  assert model.inputs_bidirectional_attention
  assert _num_params(model) == expected


# Parameter counts of the released checkpoints of the other families: exact where transformers'
# num_parameters() of google-t5/t5-*, google/mt5-* and google/byt5-small gives them, else the
# ByT5 paper's (Xue et al. 2022, table 1) rounded figure, to its last digit.
PRESET_SIZES = {
    ('t5_1_0', 'small'): 60_506_624, ('t5_1_0', 'base'): 222_903_552,
    ('t5_1_0', 'large'): 737_668_096, ('t5_1_0', '3B'): 2_851_598_336,
    ('t5_1_0', '11B'): 11_307_321_344,
    ('mt5', 'small'): 300_176_768, ('mt5', 'base'): 582_401_280, ('mt5', 'large'): 1_229_581_312,
    ('mt5', 'xl'): 3_742_619_648, ('mt5', 'xxl'): 12_921_057_280,
    ('byt5', 'small'): 299_637_760, ('byt5', 'base'): '582M', ('byt5', 'large'): '1.23B',
    ('byt5', 'xl'): '3.74B', ('byt5', 'xxl'): '12.9B',
}


def _matches_published(count: int, published: int | str) -> bool:
  """Exact for a count; for a rounded figure ('1.23B'), equal once rounded to its last digit."""
  if isinstance(published, int):
    return count == published
  number, unit = published[:-1], {'M': 1e6, 'B': 1e9}[published[-1]]
  decimals = len(number.partition('.')[2])
  return f'{count / unit:.{decimals}f}' == number


VOCABULARIES = {'t5_1_0': seqio.SentencePieceVocabulary, 'mt5': seqio.SentencePieceVocabulary,
                'byt5': seqio.ByteVocabulary}


@pytest.mark.parametrize('family,size', sorted(PRESET_SIZES))
def test_family_presets_have_the_published_sizes(family, size):
  _parse(f'gin/models/{family}/{size}.gin')  # alone: the demo task binds its own vocabulary
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  count = _num_params(model)
  assert _matches_published(count, PRESET_SIZES[family, size]), (count, PRESET_SIZES[family, size])
  assert isinstance(model.input_vocabulary, VOCABULARIES[family])
  assert model.input_vocabulary.extra_ids == (125 if family == 'byt5' else 100)
  assert model.input_vocabulary.vocab_size <= model.module.config.vocab_size
  assert model.module.config.logits_via_embedding == (family == 't5_1_0')


@pytest.mark.parametrize('size', ['small', 'xxl'])
def test_umt5_presets_have_a_table_per_layer(size):
  _parse(f'gin/models/umt5/{size}.gin')
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  config = model.module.config
  assert config.relative_attention_per_layer and not config.logits_via_embedding
  assert model.input_vocabulary.extra_ids == 300 and config.vocab_size == 256_384
  variables = jax.eval_shape(lambda rng: model.get_initial_variables(
      rng, {name: (1, 8) for name in ('encoder_input_tokens', 'decoder_input_tokens',
                                      'decoder_target_tokens')}), jax.random.PRNGKey(0))
  params = nn.unbox(variables)['params']
  assert 'relpos_bias' not in params['encoder']
  last = config.num_decoder_layers - 1
  assert params['decoder'][f'layers_{last}']['relpos_bias']['rel_embedding'].shape == (
      config.num_heads, 32)


def test_command_line_bindings_override_files():
  _parse('gin/models/t5_1_1/tiny.gin', 'gin/runs/pretrain.gin', 'gin/tasks/demo.gin',
         bindings=['BATCH_SIZE = 4', "MIXTURE_OR_TASK_NAME = 'other'"])
  assert gin.query_parameter('%BATCH_SIZE') == 4
  assert gin.query_parameter('%MIXTURE_OR_TASK_NAME') == 'other'


def test_gin_args_rewrite():
  assert gin_utils.rewrite_gin_args(['prog', "--gin.MODEL_DIR='/x'", '--gin_file=a.gin']) == [
      'prog', "--gin_bindings=MODEL_DIR = '/x'", '--gin_file=a.gin']


@pytest.mark.parametrize('preset,model_partitions,activation_dims,parameter_dims', [
    ('data_parallel', 1, 1, 1), ('model_parallel', 2, 1, 1), ('fsdp', 1, 1, 2),
    ('fsdp_model_parallel', 2, 2, 2)])
@pytest.mark.parametrize('preset_first', [False, True], ids=['after_run', 'before_run'])
def test_partitioning_presets(preset, model_partitions, activation_dims, parameter_dims,
                              preset_first):
  files = ['gin/models/t5_1_1/tiny.gin', 'gin/runs/pretrain.gin', 'gin/tasks/demo.gin']
  preset_file = f'gin/partitioning/{preset}.gin'
  _parse(*([preset_file] + files if preset_first else files + [preset_file]))
  partitioner = gin.query_parameter('train_script.train.partitioner').scoped_configurable_fn()
  assert partitioner.num_model_partitions == model_partitions
  expected = partitioning.standard_logical_axis_rules(activation_dims, parameter_dims)
  assert tuple(partitioner.logical_axis_rules) == tuple(expected)
