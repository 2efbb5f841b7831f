"""The decoder-only model: T5X's own logits, cached decoding, prefix-LM and packing masks."""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5train import decoding, models, network, testing
from t5train.decoder_only_network import DecoderOnlyTransformer

REFERENCE = pathlib.Path(__file__).parent / 'testdata' / 't5x_decoder_only' / 'reference.npz'
# The T5X models of make_reference.py, as T5Configs.
T5X_CONFIGS = {
    'causal': dict(num_decoder_layers=3, mlp_activations=('relu',), logits_via_embedding=True),
    'prefix': dict(num_decoder_layers=2, mlp_activations=('gelu', 'linear'),
                   logits_via_embedding=False),
}


def _config(**overrides: object) -> network.T5Config:
  fields = dict(vocab_size=50, emb_dim=20, num_heads=3, head_dim=7, mlp_dim=24,
                num_encoder_layers=0)
  return testing.tiny_config(**(fields | overrides))


def _t5x_reference(name: str) -> tuple[dict, dict, np.ndarray]:
  """(parameters, batch, T5X's logits) of one reference model."""
  with np.load(REFERENCE) as arrays:
    prefix = f'{name}/'
    items = {key[len(prefix):]: arrays[key] for key in arrays.files if key.startswith(prefix)}
  params = traverse_util.unflatten_dict(
      {tuple(key.split('/')[1:]): value for key, value in items.items()
       if key.startswith('params/')})
  batch = {key[len('batch/'):]: value for key, value in items.items() if key.startswith('batch/')}
  return params, batch, items['logits']


@pytest.mark.parametrize('name', sorted(T5X_CONFIGS))
def test_logits_equal_t5x_decoder_only(name):
  params, batch, expected = _t5x_reference(name)
  model = testing.tiny_decoder_only_model(_config(**T5X_CONFIGS[name]),
                                          inputs_bidirectional_attention=name == 'prefix')
  logits = model.logits(params, {**batch, 'decoder_loss_weights': None})
  real = batch['decoder_segment_ids'] > 0  # T5X and t5train differ only in what padding rows hold
  testing.assert_trees_close(np.asarray(logits)[real], expected[real], rtol=testing.SIMPLE_RTOL)


def _init(model: models.DecoderOnlyModel, length: int, seed: int = 0) -> dict:
  variables = model.get_initial_variables(jax.random.PRNGKey(seed),
                                          {'decoder_input_tokens': (1, length)})
  return jax.device_get(nn.unbox(variables['params']))


@pytest.fixture(scope='module')
def prefix_lm():
  """A tiny prefix LM with random weights of T5-like scale, and three prompts of differing
  lengths in a 14-position sequence (inputs 8 + targets 6)."""
  model = testing.tiny_decoder_only_model(_config(num_decoder_layers=2))
  params = _init(model, 14, seed=1)
  lengths = {'inputs': 8, 'targets': 6}
  prompts = [[5, 9, 1], [7, 3, 8, 4, 6, 2, 1], [11, 1]]
  features = [model.example_features({'inputs': np.asarray(p)}, lengths) for p in prompts]
  batch = {name: np.stack([f[name] for f in features]) for name in features[0]}
  return model, params, batch


def _teacher_forced(model, params, region, sequence):
  """Full recomputation: logits of ``sequence`` (decoder inputs, no padding) with the prompt's
  bidirectional region."""
  return np.asarray(model.logits(params, {'decoder_input_tokens': sequence,
                                          'decoder_target_tokens': np.ones_like(sequence),
                                          'decoder_causal_attention': region}))


@pytest.mark.parametrize('options', [{}, {'scan_layers': True},
                                     {'relative_attention_per_layer': True,
                                      'float32_attention_logits': True}],
                         ids=['unrolled', 'scanned', 'per_layer_tables'])
def test_cached_decoding_equals_full_recomputation(prefix_lm, options):
  """Every cached step's logits equal the teacher-forced logits of the same sequence, for
  rows whose prompts end at different positions (the prompt's keys and values are cached
  apart from the generated ones)."""
  model, params, batch = prefix_lm
  if options:
    model = testing.tiny_decoder_only_model(_config(num_decoder_layers=2, **options))
    params = (network.stack_layers(params) if options.get('scan_layers')
              else _init(model, 14, seed=2))
  region = batch['decoder_causal_attention']
  prompt = batch['decoder_input_tokens'] * region
  prefix = np.asarray(models.prompt_lengths(region))
  rng = np.random.default_rng(0)
  sequence = np.where(region > 0, prompt, rng.integers(2, 50, prompt.shape)).astype(np.int32)
  full = _teacher_forced(model, params, region, sequence)
  total = prompt.shape[1]
  width = total - prefix.min()  # the most positions any row generates
  cache = model._prefilled_cache(params, jnp.asarray(prompt), jnp.asarray(region),
                                 jnp.asarray(prefix), width)
  for step in range(width):
    position = np.minimum(prefix + step, total - 1)
    tokens = sequence[np.arange(3), position][:, None]
    logits, cache = model._decode_step(params, width, jnp.asarray(tokens), cache)
    live = prefix + step < total
    testing.assert_trees_close(np.asarray(logits)[live], full[np.arange(3), position][live],
                               rtol=testing.SIMPLE_RTOL)


@pytest.mark.parametrize('decode_fn', [
    functools.partial(decoding.temperature_sample, topk=1),
    functools.partial(decoding.beam_search, num_decodes=3, alpha=0.0)], ids=['greedy', 'beam'])
def test_decodes_continue_the_prompt_and_are_scored_as_recomputed(prefix_lm, decode_fn):
  model, params, batch = prefix_lm
  model.decode_fn = decode_fn
  width = 6
  decodes, aux = model.predict_batch_with_aux(params, batch, max_decode_length=width)
  decodes, scores = np.asarray(decodes), np.asarray(aux['scores'])
  region = batch['decoder_causal_attention']
  prefix = np.asarray(models.prompt_lengths(region))
  for row in range(3):
    produced = decodes[row]
    produced = produced[:np.argmax(produced == 1) + 1] if 1 in produced else produced
    sequence = batch['decoder_input_tokens'][row].copy()
    sequence[prefix[row] + 1:prefix[row] + 1 + len(produced)] = produced[:13 - prefix[row]]
    full = _teacher_forced(model, params, region[row:row + 1], sequence[None])[0]
    log_probs = jax.nn.log_softmax(full[prefix[row]:prefix[row] + len(produced)])
    expected = float(np.sum(np.take_along_axis(log_probs, produced[:, None], 1)))
    np.testing.assert_allclose(scores[row], expected, rtol=1e-5, atol=1e-5)
    if decode_fn.func is decoding.temperature_sample:
      np.testing.assert_array_equal(produced, np.argmax(full, -1)[prefix[row]:][:len(produced)])
    assert len(produced) <= min(width, 14 - prefix[row])


def test_prefix_attends_within_the_prefix_only():
  """Changing a target token leaves every prefix position's logits unchanged; changing a later
  prefix token changes earlier prefix positions under bidirectional attention only."""
  prefix_model = testing.tiny_decoder_only_model()
  causal_model = testing.tiny_decoder_only_model(inputs_bidirectional_attention=False)
  params = _init(prefix_model, 10)
  features = prefix_model.example_features({'inputs': [5, 6, 7, 1], 'targets': [9, 8, 3, 1]},
                                           {'inputs': 5, 'targets': 5})
  batch = {name: value[None] for name, value in features.items()}
  prefix_positions = np.flatnonzero(features['decoder_causal_attention'])  # 0..4
  logits = lambda model, b: np.asarray(model.logits(params, b))[0]
  base = logits(prefix_model, batch)
  changed_target = {**batch, 'decoder_input_tokens': batch['decoder_input_tokens'].copy()}
  changed_target['decoder_input_tokens'][0, 6] = 40
  after = logits(prefix_model, changed_target)
  np.testing.assert_array_equal(after[prefix_positions], base[prefix_positions])
  assert not np.allclose(after[6:], base[6:])
  changed_prefix = {**batch, 'decoder_input_tokens': batch['decoder_input_tokens'].copy()}
  changed_prefix['decoder_input_tokens'][0, 3] = 40
  assert not np.allclose(logits(prefix_model, changed_prefix)[:3], base[:3])
  np.testing.assert_array_equal(logits(causal_model, changed_prefix)[:3],
                                logits(causal_model, batch)[:3])


def test_packed_segments_never_attend_across():
  """A packed row's second segment has the logits it has alone in a row."""
  model = testing.tiny_decoder_only_model()
  params = _init(model, 16)
  lengths = {'inputs': 4, 'targets': 4}
  first = model.example_features({'inputs': [5, 6, 1], 'targets': [9, 1]}, lengths)
  second = model.example_features({'inputs': [7, 1], 'targets': [3, 4, 1]}, lengths)
  used = lambda f: int(np.sum(f['decoder_target_tokens'] > 0))
  n1, n2 = used(first), used(second)
  packed = {name: np.zeros((1, 16), first[name].dtype) for name in first}
  for name in first:
    packed[name][0, :n1] = first[name][:n1]
    packed[name][0, n1:n1 + n2] = second[name][:n2]
  packed['decoder_segment_ids'] = np.array([[1] * n1 + [2] * n2 + [0] * (16 - n1 - n2)])
  alone = {name: np.pad(value[:n2], (0, 16 - n2))[None] for name, value in second.items()}
  packed_logits = np.asarray(model.logits(params, packed))[0, n1:n1 + n2]
  alone_logits = np.asarray(model.logits(params, alone))[0, :n2]
  testing.assert_trees_close(packed_logits, alone_logits, rtol=testing.SIMPLE_RTOL)


def test_scanned_layers_give_the_per_layer_logits(prefix_lm):
  model, params, batch = prefix_lm
  scanned = testing.tiny_decoder_only_model(_config(num_decoder_layers=2, scan_layers=True))
  batch = {**batch, 'decoder_target_tokens': np.ones_like(batch['decoder_input_tokens'])}
  testing.assert_trees_close(scanned.logits(network.stack_layers(params), batch),
                             model.logits(params, batch))


def test_module_is_t5x_shaped():
  module = DecoderOnlyTransformer(_config(num_decoder_layers=1, logits_via_embedding=True))
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  names = set(traverse_util.flatten_dict(variables['params'], sep='/'))
  assert 'decoder/token_embedder/embedding' in names
  assert 'decoder/relpos_bias/rel_embedding' in names
  assert 'decoder/layers_0/self_attention/query/kernel' in names
  assert not any('encoder' in name or 'cross' in name for name in names)


def test_a_prefix_lm_run_resumes_exactly(tmp_path):
  """Checkpointing and resuming are the model-agnostic loop's; a decoder-only state saves and
  restores so that the resumed run takes the next step bit-identically."""
  from t5train import checkpoints  # noqa: PLC0415
  model = testing.tiny_decoder_only_model()
  lengths = {'inputs': 6, 'targets': 4}
  rows = [model.example_features({'inputs': [5 + i, 6, 1], 'targets': [9, 8 - i, 1]}, lengths)
          for i in range(4)]
  batch = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
  save_cfg = checkpoints.SaveCheckpointConfig(period=None, save_dataset=False, use_async=False)
  first = testing.tiny_trainer(model, batch, model_dir=str(tmp_path), save_cfg=save_cfg)
  first.trainer.train_step(batch)
  first.checkpoint_manager.save(first.trainer.train_state, force=True)
  first.checkpoint_manager.wait_until_finished()
  first.trainer.train_step(batch)
  resumed = testing.tiny_trainer(model, batch, model_dir=str(tmp_path), save_cfg=save_cfg)
  assert resumed.resumed
  resumed.trainer.train_step(batch)
  testing.assert_trees_equal(jax.device_get(resumed.train_state.params),
                             jax.device_get(first.train_state.params))
