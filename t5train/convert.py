"""``python -m t5train.convert``: move weights between Hugging Face, T5X and t5train.

    python -m t5train.convert --from=hf --input=HF_DIR --output=OUT
    python -m t5train.convert --from=t5x --input=T5X_CHECKPOINT_DIR --output=OUT
    python -m t5train.convert --to=hf --input=MODEL_DIR --output=HF_DIR
    python -m t5train.convert --to=hf --input=OUT/checkpoint_0 --gin_file=OUT/model.gin --output=HF_DIR
    python -m t5train.convert --to=merged --input=LORA_RUN --output=MERGED

``--to`` reads ``--input`` as a checkpoint directory or a model directory (its newest
checkpoint), and the model from the gin files given, else from the model directory's
``config.gin`` (a run's) or ``model.gin`` (an import's).

Imports write ``OUT/checkpoint_<step>/`` (parameters only: fine-tuning starts the
optimiser fresh) and ``OUT/model.gin`` binding the matching T5Config (and, for T5X's
decoder-only checkpoints, the decoder-only model); so does
``--to=merged``, with a LoRA-adapted checkpoint's adapters merged into its kernels. Every
local output is built in a temporary directory beside OUT and renamed at the end, so
a failed conversion leaves nothing behind; on a bucket (``gs://``), which has no
rename, the files are written in place and ``model.gin`` / ``config.json`` last.
Every path may be local or a URL that ``etils.epath`` handles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import flags, logging
from etils import epath

from t5train import (
  checkpoint_reading,
  checkpoints,
  decoder_only_network,
  gin_utils,
  hf_interop,
  models,
  network,
  paths,
)
from t5train.errors import UserError

_FROM = flags.DEFINE_enum('from', None, ['hf', 't5x'], 'Import from this format.')
_TO = flags.DEFINE_enum('to', None, ['hf', 'merged'],
                        'Export a t5train checkpoint to this format (merged: a t5train checkpoint '
                        'with LoRA adapters merged into the kernels).')
_INPUT = flags.DEFINE_string('input', None, 'The directory to read.')
_OUTPUT = flags.DEFINE_string('output', None, 'The directory to create; it must not exist.')
_DTYPE = flags.DEFINE_enum('activation_dtype', 'float32', ['float32', 'bfloat16'],
                           'Activation dtype written into model.gin (parameters stay float32).')

HF_WEIGHTS = 'model.safetensors'
HF_WEIGHTS_INDEX = 'model.safetensors.index.json'
HF_TORCH_WEIGHTS = 'pytorch_model.bin'
SENTENCEPIECE_FILE = 'spiece.model'


@contextlib.contextmanager
def atomic_output(output: str) -> Iterator[str]:
  """A directory that becomes ``output`` only if the block succeeds (paths.staged_directory)."""
  try:
    with paths.staged_directory(output) as staging:
      yield staging
  except FileExistsError as e:
    raise UserError(f'{e}; choose a new --output') from e


# ---------------------------------------------------------------- Hugging Face in


def read_hf_state_dict(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a HF model directory (safetensors, sharded safetensors or a torch .bin)."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
  path = lambda name: epath.Path(directory) / name
  if path(HF_WEIGHTS).exists():
    return load(path(HF_WEIGHTS).read_bytes())
  if path(HF_WEIGHTS_INDEX).exists():
    shards = sorted(set(json.loads(path(HF_WEIGHTS_INDEX).read_text())['weight_map'].values()))
    return {name: value for shard in shards for name, value in load(path(shard).read_bytes()).items()}
  if path(HF_TORCH_WEIGHTS).exists():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f'{path(HF_TORCH_WEIGHTS)} needs PyTorch to read; install torch or '
                      'convert the weights to safetensors') from e
    with path(HF_TORCH_WEIGHTS).open('rb') as f:
      state = torch.load(f, map_location='cpu', weights_only=True)
    return {name: value.float().numpy() for name, value in state.items()}
  raise UserError(f'{directory} holds no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or {HF_TORCH_WEIGHTS}; '
                  'it is not a Hugging Face model directory')


def read_hf_config(directory: str) -> dict[str, Any]:
  config_path = epath.Path(directory) / 'config.json'
  if not config_path.is_file():
    raise UserError(f'{directory} has no config.json; it is not a Hugging Face model directory')
  return json.loads(config_path.read_text())


# ---------------------------------------------------------------- shapes


def is_decoder_only(config: network.T5Config) -> bool:
  """Whether ``config`` describes T5X's decoder-only model (its presets have no encoder layers)."""
  return config.num_encoder_layers == 0


def expected_params(config: network.T5Config) -> dict[str, jax.ShapeDtypeStruct]:
  """Parameter path -> shape and dtype of a model built from ``config`` (nothing is allocated)."""
  def init(rng: jax.Array) -> Any:
    tokens = jax.numpy.ones((1, 8), np.int32)
    if is_decoder_only(config):
      return decoder_only_network.DecoderOnlyTransformer(config).init(
          rng, tokens, tokens, enable_dropout=False)
    return network.Transformer(config).init(rng, tokens, tokens, tokens, enable_dropout=False)
  variables = jax.eval_shape(init, jax.random.PRNGKey(0))
  return dict(checkpoint_reading.flatten_with_names(nn.unbox(variables)['params']))


def check_flat_shapes(flat: Mapping[str, Any], config: network.T5Config, source: str) -> None:
  """UserError naming the first tensor whose shape disagrees with ``config`` (or is missing)."""
  checkpoint_reading.check_shapes(expected_params(config), flat, source)


# ---------------------------------------------------------------- model.gin


def model_gin_text(config: network.T5Config, source: str, checkpoint: str,
                   sentencepiece_file: str | None) -> str:
  """A model gin file (on top of base_architecture.gin) binding ``config``."""
  decoder_only = is_decoder_only(config)
  architecture = 'decoder_only' if decoder_only else 't5_1_1'
  lines = [
      f'# A T5 {"decoder-only " if decoder_only else ""}model converted by t5train.convert '
      f'from {source}.',
      '#',
      f'#   python -m t5train.train --gin_file={os.path.dirname(checkpoint)}/model.gin \\',
      '#       --gin_file=gin/runs/finetune.gin --gin_file=gin/tasks/YOUR_TASK.gin \\',
      f'#       --gin.INITIAL_CHECKPOINT_PATH="\'{checkpoint}\'" --gin.MODEL_DIR=... '
      '--gin.TRAIN_STEPS=...',
      'from __gin__ import dynamic_registration',
      'import seqio',
      'from t5train import network',
      f"include 'models/{architecture}/base_architecture.gin'",
      '',
  ]
  if decoder_only:
    lines += ['# The weights do not say whether the inputs of a prefix LM attend to each other in',
              "# both directions (this file's default) or causally (T5X's class default: False).",
              'INPUTS_BIDIRECTIONAL_ATTENTION = True', '']
  lines += [
      'network.T5Config:',
  ]
  for field in ('vocab_size', 'dtype', 'emb_dim', 'num_heads', 'num_encoder_layers',
                'num_decoder_layers', 'head_dim', 'mlp_dim', 'mlp_activations',
                'logits_via_embedding', 'relative_attention_num_buckets',
                'relative_attention_max_distance', 'relative_attention_per_layer',
                'layer_norm_epsilon'):
    value = getattr(config, field)
    lines.append(f'  {field} = {tuple(value) if field == "mlp_activations" else repr(value)}')
  if sentencepiece_file:
    lines += ['', 'VOCABULARY = @seqio.SentencePieceVocabulary()',
              f"seqio.SentencePieceVocabulary.sentencepiece_model_file = '{sentencepiece_file}'"]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------- the three directions


def import_hf(input_dir: str, output: str, dtype: str = 'float32') -> str:
  """HF model directory -> ``output/checkpoint_0`` + ``output/model.gin``; returns the checkpoint."""
  hf_config = read_hf_config(input_dir)
  config = hf_interop.t5_config_from_hf_config(hf_config, dtype)
  config, hf_flat = hf_interop.model_from_hf(hf_config, config, read_hf_state_dict(input_dir))
  check_flat_shapes(hf_flat, config, input_dir)
  spm = epath.Path(input_dir) / SENTENCEPIECE_FILE
  return _write_import(hf_interop.nest(hf_flat), 0, config, input_dir, output,
                       os.fspath(spm) if spm.is_file() else None)


def import_t5x(input_dir: str, output: str, dtype: str = 'float32',
               config: network.T5Config | None = None) -> str:
  """T5X checkpoint (encoder-decoder or decoder-only, per-layer or scanned) ->
  ``output/checkpoint_<step>`` + ``output/model.gin``, in the layer layout ``config.scan_layers``
  asks for (per-layer without a config)."""
  from t5train import t5x_checkpoint  # pylint: disable=g-import-not-at-top
  flat, scanned_counts = t5x_checkpoint.unscan_layers(t5x_checkpoint.read_t5x_params(input_dir))
  if config is not None:
    _check_layer_counts(scanned_counts, config, input_dir)
  config = config or t5_config_from_shapes(flat, dtype)
  per_layer_config = dataclasses.replace(config, scan_layers=False)
  check_flat_shapes(flat, per_layer_config, input_dir)
  step = t5x_checkpoint.read_t5x_step(input_dir)
  params = hf_interop.nest(flat)
  if config.scan_layers and not is_decoder_only(config):  # decoder-only models do not scan
    params = jax.tree_util.tree_map(np.asarray, network.stack_layers(params))
  return _write_import(params, step, config, input_dir, output, None)


def _check_layer_counts(scanned_counts: Mapping[str, int], config: network.T5Config,
                        source: str) -> None:
  """UserError when a scanned stack holds another number of layers than the gin's config."""
  for stack, count in scanned_counts.items():
    expected = getattr(config, f'num_{stack}_layers')
    if count != expected:
      raise UserError(f'{source}: the scanned {stack} holds {count} layers but the gin file\'s '
                      f'network.T5Config.num_{stack}_layers is {expected}')


def t5_config_from_shapes(flat: Mapping[str, Any], dtype: str = 'float32') -> network.T5Config:
  """The T5Config that T5X parameter shapes imply, of an encoder-decoder or, when the parameters
  are all under ``decoder/`` (T5X's ``examples/decoder_only``), of a decoder-only model.

  Weights do not record the activation or the relative-attention max distance:
  two MLP inputs are read as T5 1.1's gated-GELU, one as ReLU, and the distance
  is T5's 128. Pass --gin_file to say otherwise.
  """
  def shape(name: str) -> tuple[int, ...]:
    if name not in flat:
      raise UserError(f'the checkpoint has no {name}; it is not a T5 encoder-decoder or '
                      'decoder-only model')
    return tuple(flat[name].shape)
  decoder_only = not any(name.startswith('encoder/') for name in flat)
  # The stack whose first layer tells the widths, and the name of that layer's attention.
  stack, attention = ('decoder', 'self_attention') if decoder_only else ('encoder', 'attention')
  vocab_size, emb_dim = shape('decoder/token_embedder/embedding' if decoder_only
                              else 'token_embedder/embedding')
  per_layer_relpos = f'{stack}/relpos_bias/rel_embedding' not in flat
  num_heads, num_buckets = shape(f'{stack}/layers_0/relpos_bias/rel_embedding' if per_layer_relpos
                                 else f'{stack}/relpos_bias/rel_embedding')
  inner = shape(f'{stack}/layers_0/{attention}/query/kernel')[1]
  count = lambda stack: len({k.split('/')[1] for k in flat if k.startswith(f'{stack}/layers_')})
  gated = f'{stack}/layers_0/mlp/wi_0/kernel' in flat
  mlp_dim = shape(f'{stack}/layers_0/mlp/' + ('wi_0' if gated else 'wi') + '/kernel')[1]
  return network.T5Config(
      vocab_size=vocab_size, dtype=dtype, emb_dim=emb_dim, num_heads=num_heads,
      num_encoder_layers=0 if decoder_only else count('encoder'),
      num_decoder_layers=count('decoder'), head_dim=inner // num_heads, mlp_dim=mlp_dim,
      mlp_activations=('gelu', 'linear') if gated else ('relu',), dropout_rate=0.0,
      logits_via_embedding='decoder/logits_dense/kernel' not in flat,
      relative_attention_num_buckets=num_buckets,
      relative_attention_per_layer=per_layer_relpos)


def _write_import(params: Mapping[str, Any], step: int, config: network.T5Config, source: str,
                  output: str, sentencepiece_file: str | None) -> str:
  final = os.fspath(paths.resolve(output))
  checkpoint = checkpoints.checkpoint_dir(final, step)
  with atomic_output(final) as staging:
    checkpoints.save_params(staging, params, step)
    spm_target = None
    if sentencepiece_file:
      epath.Path(sentencepiece_file).copy(epath.Path(staging) / SENTENCEPIECE_FILE)
      spm_target = paths.join(final, SENTENCEPIECE_FILE)
    # Written last: on a bucket, its presence says the import is complete.
    (epath.Path(staging) / 'model.gin').write_text(
        model_gin_text(config, source, checkpoint, spm_target))
  return checkpoint


def read_checkpoint_params(checkpoint: str, config: network.T5Config) -> dict[str, np.ndarray]:
  """Float32 numpy parameters (flat) of a t5train checkpoint, checked against ``config``."""
  if not epath.Path(checkpoint_reading.item_dir(checkpoint)).is_dir():
    raise UserError(f'{checkpoint} is not a t5train checkpoint '
                    f'(no {checkpoint_reading.STATE_ITEM}/)')
  expected = expected_params(config)
  saved = dict(checkpoint_reading.flatten_with_names(
      checkpoint_reading.saved_state_tree(checkpoint).get('params', {})))
  check_flat_shapes(saved, config, checkpoint)
  wanted = {'params': hf_interop.nest({name: np.zeros(leaf.shape, np.float32)
                                       for name, leaf in expected.items()})}
  restored = checkpoint_reading.restore_partial(checkpoint, wanted)
  return {name: np.asarray(value)
          for name, value in checkpoint_reading.flatten_with_names(restored['params'])}


def _merged(flat: Mapping[str, np.ndarray], config: network.T5Config
            ) -> tuple[dict[str, np.ndarray], network.T5Config]:
  """The parameters and config of the plain model that computes what the LoRA-adapted one does
  (``flat`` and ``config`` themselves without adapters)."""
  if config.lora is None:
    return dict(flat), config
  merged = network.merge_lora(hf_interop.nest(flat), config.lora)
  flat = {name: np.asarray(value) for name, value in checkpoint_reading.flatten_with_names(merged)}
  return flat, dataclasses.replace(config, lora=None)


def export_merged(checkpoint: str, config: network.T5Config, output: str,
                  sentencepiece_file: str | None = None) -> str:
  """A LoRA-adapted t5train checkpoint -> ``output/checkpoint_<step>`` with the adapters merged
  into the kernels, and ``output/model.gin`` for the plain model."""
  if config.lora is None:
    raise UserError('--to=merged merges LoRA adapters, and the gin files bind no '
                    'network.T5Config.lora (add gin/models/lora.gin after the model file)')
  match = re.fullmatch(rf'{checkpoint_reading.STEP_PREFIX}_(\d+)',
                       epath.Path(checkpoint).name)
  if match is None:
    raise UserError(f'--input {checkpoint} is not a {checkpoint_reading.STEP_PREFIX}_<step> '
                    'directory')
  flat, config = _merged(read_checkpoint_params(checkpoint, config), config)
  return _write_import(hf_interop.nest(flat), int(match.group(1)), config, checkpoint, output,
                       sentencepiece_file)


def export_hf(checkpoint: str, config: network.T5Config, output: str,
              sentencepiece_file: str | None = None) -> None:
  """t5train checkpoint -> HF directory (config.json, model.safetensors, tokenizer files).

  A model with LoRA adapters (``config.lora``) is written merged: transformers' plain T5
  computes what the adapted model does.
  """
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  flat, config = _merged(read_checkpoint_params(checkpoint, config), config)
  hf_config = hf_interop.hf_config_from_t5_config(config)
  state_dict = hf_interop.hf_state_dict_from_flat_params(flat, config)
  with atomic_output(output) as staging:
    staging = epath.Path(staging)
    (staging / HF_WEIGHTS).write_bytes(save(state_dict, metadata={'format': 'pt'}))
    if sentencepiece_file:
      epath.Path(sentencepiece_file).copy(staging / SENTENCEPIECE_FILE)
      (staging / 'tokenizer_config.json').write_text(json.dumps(
          {'tokenizer_class': 'T5Tokenizer', 'model_max_length': 512}, indent=2))
    # Written last: on a bucket, its presence says the export is complete.
    (staging / 'config.json').write_text(json.dumps(hf_config, indent=2))


# ---------------------------------------------------------------- the binary


RUN_CONFIG_FILES = ('config.gin', 'model.gin')  # a training run's operative config; an import's


def checkpoint_to_read(path: str) -> str:
  """``path`` itself when it is a checkpoint, else the newest checkpoint of the model directory."""
  return checkpoint_reading.find_checkpoints(path)[-1][1]


def run_config_file(checkpoint: str) -> str:
  """The config.gin (or an import's model.gin) of the model directory that holds ``checkpoint``
  (``MODEL_DIR/checkpoint_<step>`` or ``MODEL_DIR/best/checkpoint_<step>``)."""
  model_dir = epath.Path(checkpoint).parent
  if model_dir.name == 'best' and not any((model_dir / n).exists() for n in RUN_CONFIG_FILES):
    model_dir = model_dir.parent
  for name in RUN_CONFIG_FILES:
    if (model_dir / name).exists():
      return os.fspath(model_dir / name)
  raise UserError(f'no --gin_file, and {model_dir} has no {" or ".join(RUN_CONFIG_FILES)}: give '
                  'the model\'s gin files (e.g. --gin_file=MODEL_DIR/config.gin or '
                  'gin/models/t5_1_1/small.gin)')


def gin_model(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              search_paths: Sequence[str] = ()) -> models.BaseTransformerModel:
  """The MODEL the gin files bind, built as the binaries build it.

  Gin evaluates ``%MODEL`` in the scope ``MODEL``, which is where a run's config.gin binds the
  model's settings (``MODEL/network.T5Config.emb_dim = ...``).
  """
  import gin  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(gin_files, gin_bindings, search_paths)
  try:
    reference = gin.query_parameter('%MODEL')
  except ValueError as e:
    raise UserError('the gin files must bind MODEL (e.g. --gin_file=OUT/model.gin or '
                    'gin/models/t5_1_1/small.gin)') from e
  with gin.config_scope('MODEL'):
    return reference.scoped_configurable_fn()


def gin_model_config(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                     search_paths: Sequence[str] = (), decoder_only_too: bool = False
                     ) -> tuple[network.T5Config, str | None]:
  """The T5Config and SentencePiece file (if any) of the MODEL the gin files bind; a
  decoder-only MODEL only with ``decoder_only_too``."""
  model = gin_model(gin_files, gin_bindings, search_paths)
  decoder_only = decoder_only_too and isinstance(model, models.DecoderOnlyModel)
  if not isinstance(model, models.EncoderDecoderModel) and not decoder_only:
    raise UserError(f'this conversion moves encoder-decoder weights, and MODEL is a '
                    f'{type(model).__name__} (transformers has no T5 decoder-only class)')
  config = model.module.config
  if decoder_only:  # a decoder-only model leaves num_encoder_layers unused; here 0 says what it is
    config = dataclasses.replace(config, num_encoder_layers=0)
  return config, getattr(model.output_vocabulary, 'sentencepiece_model_file', None)


def convert(*, source: str | None = None, target: str | None = None, input_path: str,
            output: str, dtype: str = 'float32', gin_files: Sequence[str] = (),
            gin_bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> str:
  """What the binary does: import from ``source`` ('hf', 't5x') or export to ``target`` ('hf',
  'merged'); the model of an export comes from ``gin_files``, else from the model directory's
  config.gin or model.gin. Returns what was written."""
  if (source is None) == (target is None):
    raise UserError('give exactly one of --from=hf|t5x or --to=hf|merged')
  if not input_path or not output:
    raise UserError('--input and --output are required')
  if not epath.Path(input_path).is_dir():
    raise UserError(f'--input {input_path} is not a directory')
  if source == 'hf':
    return import_hf(input_path, output, dtype)
  if source == 't5x':
    config = None
    if gin_files:
      config = gin_model_config(gin_files, gin_bindings, search_paths, decoder_only_too=True)[0]
    return import_t5x(input_path, output, dtype, config)
  checkpoint = checkpoint_to_read(input_path)
  config, sentencepiece_file = gin_model_config(
      list(gin_files) or [run_config_file(checkpoint)], gin_bindings, search_paths,
      decoder_only_too=target == 'merged')
  if target == 'merged':
    return export_merged(checkpoint, config, output, sentencepiece_file)
  export_hf(checkpoint, config, output, sentencepiece_file)
  return output


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  written = convert(source=_FROM.value, target=_TO.value, input_path=_INPUT.value,
                    output=_OUTPUT.value, dtype=_DTYPE.value, gin_files=flags.FLAGS.gin_file,
                    gin_bindings=flags.FLAGS.gin_bindings,
                    search_paths=flags.FLAGS.gin_search_paths)
  logging.info('Wrote %s.', written)
  print(f'wrote {written}', flush=True)


def console_main() -> None:
  flags.adopt_module_key_flags(gin_utils)
  gin_utils.run(main, program='t5train.convert')


if __name__ == '__main__':
  console_main()
