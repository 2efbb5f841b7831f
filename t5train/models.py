"""The models: a network plus its loss, metrics, initialisation, features and decoding.

``EncoderDecoderModel`` (T5) and ``DecoderOnlyModel`` (causal or prefix LM) share
the loss, metrics and scoring of ``BaseTransformerModel``. They hold no training
state and do no I/O. seqio is imported lazily (only for ``FEATURE_CONVERTER_CLS``)
so that the models run where TensorFlow is absent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5train import decoding, losses

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, clu_metrics.Metric]


class _SeqioFeatureConverter:
  """Resolves to the named seqio feature converter class on first access."""

  def __init__(self, name: str):
    self._name = name

  def __get__(self, obj: Any, owner: type) -> type:
    import seqio  # pylint: disable=g-import-not-at-top
    return getattr(seqio, self._name)


def _pad(tokens: Any, length: int) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)[:length]
  return np.pad(tokens, (0, length - len(tokens)))


_EXAMPLES, _NONPADDING, _POSITIONS = 'examples/', 'nonpadding/', 'positions/'


def _is_self_cache(path: tuple) -> bool:
  """Whether a decoding-cache leaf holds self-attention keys or values of past positions."""
  return str(getattr(path[-1], 'key', '')) in ('cached_key', 'cached_value')


def count_packed_examples(segment_ids: Array) -> Array:
  """The examples in a [batch, length] array of segment ids (0 is padding), as T5X counts them:
  the changes of id along each row, plus the rows, less the rows that end in padding."""
  changes = jnp.sum(segment_ids[:, 1:] != segment_ids[:, :-1])
  return changes + segment_ids.shape[0] - jnp.sum(segment_ids[:, -1] == 0)


def _packing_sums(batch: Batch) -> dict[str, Array]:
  """Per feature of the batch: its examples, real tokens and positions (T5X's features: the
  ``<feature>_segment_ids`` of a packed batch, else ``encoder_input_tokens`` and
  ``decoder_target_tokens`` with 0 as padding)."""
  segment_ids = {name[:-len('_segment_ids')]: ids for name, ids in batch.items()
                 if name.endswith('_segment_ids')}
  if not segment_ids:
    segment_ids = {name: (batch[name] != 0).astype(jnp.int32)
                   for name in ('encoder_input_tokens', 'decoder_target_tokens') if name in batch}
  sums = {}
  for feature, ids in segment_ids.items():
    if ids.ndim != 2 or ids.shape[1] == 0:
      continue
    sums[_EXAMPLES + feature] = count_packed_examples(ids).astype(jnp.float32)
    sums[_NONPADDING + feature] = jnp.sum(ids != 0).astype(jnp.float32)
    sums[_POSITIONS + feature] = jnp.asarray(ids.size, jnp.float32)
  return sums


class BaseTransformerModel:
  """Loss, metrics, scoring and shapes shared by the model classes (T5X's names).

  A subclass gives ``logits``, ``get_initial_variables``, ``predict_batch_with_aux``
  and ``example_features``; its batches hold ``decoder_target_tokens`` and
  ``decoder_loss_weights``.
  """

  FEATURE_CONVERTER_CLS: Any = None

  def __init__(self, module: nn.Module, input_vocabulary: Any, output_vocabulary: Any,
               optimizer_def: Any, decode_fn: Callable[..., Any] = decoding.temperature_sample,
               z_loss: float = 0.0, label_smoothing: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.optimizer_def = optimizer_def
    self.decode_fn = decode_fn
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor

  def input_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int]
                   ) -> dict[str, tuple[int, int]]:
    """Shapes of the model features of a batch (what the feature converter produces)."""
    lengths = self.FEATURE_CONVERTER_CLS(pack=False).get_model_feature_lengths(
        dict(task_feature_lengths))
    return {name: (batch_size, length) for name, length in lengths.items()}

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    raise NotImplementedError

  def normalize_loss_weights(self, batch: Batch) -> tuple[dict[str, Array], float | None]:
    """Folds the loss normaliser into ``decoder_loss_weights`` for the whole batch.

    Returns the batch and the constant factor still to divide by (or None), so
    that summing the losses of microbatches gives the loss of the batch.
    """
    weights, factor = losses.loss_weights_and_factor(batch['decoder_loss_weights'],
                                                     self.loss_normalizing_factor)
    return {**batch, 'decoder_loss_weights': weights}, factor

  def loss_fn(self, params: Any, batch: Batch, dropout_rng: Array | None,
              loss_normalizing_factor: float | None = None,
              normalized: bool = False) -> tuple[Array, dict[str, Array]]:
    """Loss to minimise and the sums behind the metrics, for one (micro)batch.

    The sums add up over microbatches; ``metrics`` turns them into T5X-named
    metrics. Unless ``normalized`` says the batch already went through
    ``normalize_loss_weights``, that is done here first.
    """
    if not normalized:
      batch, loss_normalizing_factor = self.normalize_loss_weights(batch)
    logits = self.logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = batch['decoder_loss_weights']
    loss, z_loss, _ = losses.compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, loss_normalizing_factor)
    counted = (weights > 0).astype(jnp.float32)
    per_token_ce, _, _ = losses.compute_weighted_cross_entropy(logits, targets, counted)
    correct, num_tokens = losses.token_accuracy(logits, targets, counted)
    return loss, {'loss': loss, 'z_loss': z_loss, 'per_token_cross_ent_sum': per_token_ce,
                  'num_correct': correct, 'num_tokens': num_tokens,
                  'num_positions': jnp.asarray(counted.size, jnp.float32),
                  **_packing_sums(batch)}

  @staticmethod
  def metrics(sums: dict[str, Array]) -> Metrics:
    """T5X-named clu metrics of one step from the sums of ``loss_fn``.

    Each is a clu ``Average`` whose total and count add up over the steps of a summary, as
    T5X's ``compute_base_metrics`` defines them: ``loss`` (and ``cross_ent_loss``, ``z_loss``)
    per step; ``*_per_all_target_tokens`` per target position, padding included;
    ``*_per_nonpadding_target_token`` per real target token. ``cross_ent_per_nonpadding_target_token``
    (t5train's) is the cross entropy per real target token without label smoothing, z-loss or
    normalising factor.
    """
    one = jnp.ones((), jnp.int32)
    average = clu_metrics.Average
    loss, z_loss = sums['loss'], sums['z_loss']
    positions, nonpadding = sums['num_positions'], sums['num_tokens']
    metrics = {
        'loss': average(total=loss, count=one),
        'loss_per_nonpadding_target_token': average(total=loss, count=nonpadding),
        'loss_per_all_target_tokens': average(total=loss, count=positions),
        'cross_ent_loss': average(total=loss - z_loss, count=one),
        'cross_ent_loss_per_all_target_tokens': average(total=loss - z_loss, count=positions),
        'cross_ent_per_nonpadding_target_token': average(total=sums['per_token_cross_ent_sum'],
                                                         count=nonpadding),
        'z_loss': average(total=z_loss, count=one),
        'z_loss_per_all_target_tokens': average(total=z_loss, count=positions),
        'accuracy': average(total=sums['num_correct'], count=nonpadding),
        'non_padding_fraction/loss_weights': average(total=nonpadding, count=positions),
    }
    features = [name[len(_EXAMPLES):] for name in sums if name.startswith(_EXAMPLES)]
    for feature in features:
      metrics[f'effective_batch_size/{feature}'] = average(total=sums[_EXAMPLES + feature],
                                                            count=one)
      metrics[f'non_padding_fraction/{feature}'] = average(
          total=sums[_NONPADDING + feature], count=sums[_POSITIONS + feature])
    if features:
      metrics['non_padding_fraction/overall'] = average(
          total=sum(sums[_NONPADDING + f] for f in features),
          count=sum(sums[_POSITIONS + f] for f in features))
    return metrics

  def score_batch(self, params: Any, batch: Batch, return_intermediates: bool = False) -> Array:
    """Log-likelihood of each example's targets [batch]: the sum over its weighted tokens."""
    del return_intermediates  # accepted for T5X compatibility
    logits = self.logits(params, batch, dropout_rng=None)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    targets = batch['decoder_target_tokens']
    token_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = batch.get('decoder_loss_weights')
    weights = (targets > 0) if weights is None else weights
    return jnp.sum(token_log_probs * weights, axis=-1)

  def _decode(self, tokens_to_logits: decoding.TokensToLogits, cache: Any, rows: int,
              length: int, rng: Array | None, decoder_params: Mapping[str, Any] | None,
              num_decodes: int | None, return_all_decodes: bool, **extra: Any
              ) -> tuple[Array, dict[str, Array]]:
    """Runs ``decode_fn`` with ``decoder_params`` (and ``num_decodes`` when given, else
    ``decode_fn``'s own); the best decode and its score, or all of them, best first."""
    decoder_params = dict(decoder_params or {})
    if num_decodes is not None:
      decoder_params['num_decodes'] = num_decodes
    if 'max_lengths' in extra and 'max_lengths' in decoder_params:  # both limits hold
      decoder_params['max_lengths'] = jnp.minimum(extra.pop('max_lengths'),
                                                  decoder_params['max_lengths'])
    eos_id = getattr(self.output_vocabulary, 'eos_id', 1)
    decodes, scores = self.decode_fn(tokens_to_logits, cache, rows, length, eos_id,
                                     decode_rng=rng, **extra, **decoder_params)
    if return_all_decodes:
      return decodes, {'scores': scores}
    return decodes[:, 0], {'scores': scores[:, 0]}

  def predict_batch(self, params: Any, batch: Batch, rng: Array | None = None,
                    decoder_params: Mapping[str, Any] | None = None,
                    max_decode_length: int | None = None) -> Array:
    """The best decode of each example [batch, length] (0 after EOS)."""
    return self.predict_batch_with_aux(params, batch, rng, decoder_params,
                                       max_decode_length=max_decode_length)[0]


class EncoderDecoderModel(BaseTransformerModel):
  """A T5-style encoder-decoder with T5X's constructor and method names."""

  FEATURE_CONVERTER_CLS = _SeqioFeatureConverter('EncDecFeatureConverter')

  def example_features(self, example: Mapping[str, Any], lengths: Mapping[str, int]
                       ) -> dict[str, np.ndarray]:
    """Padded model features of one task example (``inputs``, optional ``targets``)."""
    features = {'encoder_input_tokens': _pad(example['inputs'], lengths['inputs'])}
    if 'targets' in example and 'targets' in lengths:
      targets = _pad(example['targets'], lengths['targets'])
      features['decoder_target_tokens'] = targets
      features['decoder_input_tokens'] = np.pad(targets, (1, 0))[:-1]
      features['decoder_loss_weights'] = (targets > 0).astype(np.float32)
    return features

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Any],
                            input_types: Mapping[str, Any] | None = None) -> Any:
    """Initial variables (parameters boxed with their logical axis names)."""
    input_types = input_types or {}
    tokens = lambda name: jnp.ones(tuple(input_shapes[name]), input_types.get(name, jnp.int32))
    return self.module.init(rng, tokens('encoder_input_tokens'), tokens('decoder_input_tokens'),
                            tokens('decoder_target_tokens'), enable_dropout=False)

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """Teacher-forced logits [batch, target_length, vocab]; dropout only with an rng."""
    return self.module.apply(
        {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch['decoder_target_tokens'], batch.get('encoder_segment_ids'),
        batch.get('decoder_segment_ids'), enable_dropout=dropout_rng is not None,
        rngs=None if dropout_rng is None else {'dropout': dropout_rng})

  def predict_batch_with_aux(self, params: Any, batch: Batch, rng: Array | None = None,
                             decoder_params: Mapping[str, Any] | None = None,
                             return_all_decodes: bool = False, num_decodes: int | None = None,
                             max_decode_length: int | None = None
                             ) -> tuple[Array, dict[str, Array]]:
    """Decodes with ``decode_fn`` from a key/value cache; aux holds the ``scores``.

    ``decoder_params`` are passed to ``decode_fn`` (e.g. temperature, alpha), as is
    ``num_decodes`` when given (otherwise ``decode_fn``'s own, e.g. from gin, holds).
    The decode length is ``max_decode_length``, else the width of
    ``decoder_target_tokens`` or ``decoder_input_tokens`` in the batch. With
    ``return_all_decodes`` the outputs are [batch, num_decodes, ...], best first.
    """
    length = max_decode_length or _decode_length(batch)
    inputs = batch['encoder_input_tokens']
    encoded = self.module.apply({'params': params}, inputs, enable_dropout=False,
                                method=self.module.encode)
    cache = self._initial_cache(params, encoded, inputs, length)
    tokens_to_logits = functools.partial(self._decode_step, params, encoded, inputs, length)
    return self._decode(tokens_to_logits, cache, inputs.shape[0], length, rng, decoder_params,
                        num_decodes, return_all_decodes)

  def _initial_cache(self, params: Any, encoded: Array, encoder_tokens: Array,
                     length: int) -> Any:
    """Empty self-attention caches of ``length`` positions and the projected encoder outputs.

    The creating call runs the decoder over a placeholder; its self-attention keys and
    values would be overwritten before any step reads them, so they are zeros instead,
    which lets XLA drop that whole decoder pass and keep only the cross projections.
    """
    placeholder = jnp.zeros((encoded.shape[0], length), jnp.int32)
    _, variables = self.module.apply(
        {'params': params}, encoded, encoder_tokens, placeholder, enable_dropout=False,
        decode=True, max_decode_length=length, method=self.module.decode, mutable=['cache'])
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if _is_self_cache(path) else x, variables['cache'])

  def _decode_step(self, params: Any, encoded: Array, encoder_tokens: Array, length: int,
                   tokens: Array, cache: Any) -> tuple[Array, Any]:
    """Logits [rows, vocab] for the next position after ``tokens`` [rows, 1], and the new cache.

    A decode function may run several decodes per example (rows = examples x decodes).
    The encoder side keeps one row per example: the cached cross-attention keys and
    values are shared by the example's decodes, and ``encoder_tokens`` only gives
    their padding.
    """
    logits, variables = self.module.apply(
        {'params': params, 'cache': cache}, encoded, encoder_tokens, tokens,
        enable_dropout=False, decode=True, max_decode_length=length, method=self.module.decode,
        mutable=['cache'])
    return logits[:, 0], variables['cache']


class DecoderOnlyModel(BaseTransformerModel):
  """A decoder-only LM (T5X's ``DecoderOnlyModel``): causal LM on targets-only tasks, prefix LM
  on tasks with inputs and targets.

  seqio's ``DecoderFeatureConverter`` chooses by the task's feature lengths: with
  ``inputs`` they are concatenated before the targets and the loss is on the
  targets only (``PrefixLMFeatureConverter``). ``inputs_bidirectional_attention``
  lets the inputs part attend in both directions (Raffel et al.'s prefix LM); T5X's
  default is causal attention everywhere. Decoding continues the inputs: the cache
  is filled from them in one pass and the outputs are the continuation only.
  """

  FEATURE_CONVERTER_CLS = _SeqioFeatureConverter('DecoderFeatureConverter')

  def __init__(self, module: nn.Module, vocabulary: Any, optimizer_def: Any,
               decode_fn: Callable[..., Any] = decoding.temperature_sample,
               inputs_bidirectional_attention: bool = False,
               feature_converter_cls: Callable[..., Any] | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizingFactor = None):
    if feature_converter_cls is not None:
      self.FEATURE_CONVERTER_CLS = feature_converter_cls  # pylint: disable=invalid-name
    self.inputs_bidirectional_attention = inputs_bidirectional_attention
    super().__init__(module, vocabulary, vocabulary, optimizer_def, decode_fn, z_loss,
                     label_smoothing, loss_normalizing_factor)

  def example_features(self, example: Mapping[str, Any], lengths: Mapping[str, int]
                       ) -> dict[str, np.ndarray]:
    """Padded model features of one task example, as seqio's ``DecoderFeatureConverter``
    makes them unpacked; with inputs but no targets, only what decoding reads."""
    has_targets = 'targets' in example and 'targets' in lengths
    targets = np.asarray(example['targets'], np.int32)[:lengths['targets']] if has_targets else []
    if 'inputs' not in lengths:  # causal LM
      total = lengths['targets']
      sequence, prefix = np.asarray(targets, np.int32), 0
    else:
      total = lengths['inputs'] + lengths.get('targets', 0)
      inputs = np.asarray(example['inputs'], np.int32)[:lengths['inputs']]
      sequence, prefix = np.concatenate([inputs, np.asarray(targets, np.int32)]), len(inputs)
    target_tokens = _pad(sequence, total)
    positions = np.arange(total)
    features = {'decoder_input_tokens': np.pad(target_tokens, (1, 0))[:-1]}
    if 'inputs' in lengths:
      features['decoder_causal_attention'] = (positions < prefix + 1).astype(np.int32)
    if has_targets or 'inputs' not in lengths:
      features['decoder_target_tokens'] = target_tokens
      features['decoder_loss_weights'] = ((positions >= prefix) &
                                          (positions < len(sequence))).astype(np.float32)
    return features

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Any],
                            input_types: Mapping[str, Any] | None = None) -> Any:
    """Initial variables (parameters boxed with their logical axis names)."""
    shape = tuple(input_shapes['decoder_input_tokens'])
    dtype = (input_types or {}).get('decoder_input_tokens', jnp.int32)
    return self.module.init(rng, jnp.ones(shape, dtype), jnp.ones(shape, dtype),
                            enable_dropout=False)

  def _bidirectional_region(self, batch: Batch) -> Array | None:
    if not self.inputs_bidirectional_attention:
      return None
    if 'decoder_causal_attention' not in batch:
      raise ValueError('inputs_bidirectional_attention needs the decoder_causal_attention '
                       'feature: a task with inputs and seqio.PrefixLMFeatureConverter (or '
                       'DecoderFeatureConverter)')
    return batch['decoder_causal_attention']

  def logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
    """Teacher-forced logits [batch, length, vocab]; dropout only with an rng."""
    return self.module.apply(
        {'params': params}, batch['decoder_input_tokens'], batch['decoder_target_tokens'],
        batch.get('decoder_segment_ids'), batch.get('decoder_positions'),
        self._bidirectional_region(batch), enable_dropout=dropout_rng is not None,
        rngs=None if dropout_rng is None else {'dropout': dropout_rng})

  def predict_batch_with_aux(self, params: Any, batch: Batch, rng: Array | None = None,
                             decoder_params: Mapping[str, Any] | None = None,
                             return_all_decodes: bool = False, num_decodes: int | None = None,
                             max_decode_length: int | None = None
                             ) -> tuple[Array, dict[str, Array]]:
    """Continues each example's inputs with ``decode_fn``; aux holds the ``scores``.

    The prompt is ``decoder_input_tokens`` where ``decoder_causal_attention`` is 1.
    Outputs are the continuation only, [batch, max_decode_length] (default: the
    sequence length); each example stops where its sequence ends. Arguments as
    ``EncoderDecoderModel.predict_batch_with_aux``.
    """
    if 'decoder_causal_attention' not in batch:
      raise ValueError('decoding continues the inputs, and this batch has no '
                       'decoder_causal_attention: give the task inputs and targets lengths '
                       '(seqio.PrefixLMFeatureConverter) to decode')
    region = batch['decoder_causal_attention']
    prompt = batch['decoder_input_tokens'] * region
    rows, total = prompt.shape
    prefix = prompt_lengths(region)
    width = max_decode_length or total
    cache = self._prefilled_cache(params, prompt, region, prefix, width)
    tokens_to_logits = functools.partial(self._decode_step, params, width)
    return self._decode(
        tokens_to_logits, cache, rows, width, rng, decoder_params, num_decodes,
        return_all_decodes,
        first_tokens=jnp.take_along_axis(prompt, prefix[:, None], axis=1)[:, 0],
        max_lengths=jnp.minimum(width, total - prefix))

  def _prefilled_cache(self, params: Any, prompt: Array, region: Array, prefix: Array,
                       width: int) -> Any:
    """The cache with the keys and values of each row's first ``prefix`` positions, and room
    for ``width`` generated ones per decode."""
    _, variables = self.module.apply(
        {'params': params}, prompt, region, None, None,
        region if self.inputs_bidirectional_attention else None, enable_dropout=False,
        decode=True, max_decode_length=width, prefill_lengths=prefix, mutable=['cache'])
    return variables['cache']

  def _decode_step(self, params: Any, width: int, tokens: Array, cache: Any
                   ) -> tuple[Array, Any]:
    """Logits [rows, vocab] of the token after ``tokens`` [rows, 1], and the new cache."""
    logits, variables = self.module.apply(
        {'params': params, 'cache': cache}, tokens, enable_dropout=False, decode=True,
        max_decode_length=width, mutable=['cache'])
    return logits[:, 0], variables['cache']


def prompt_lengths(decoder_causal_attention: Array) -> Array:
  """Per row, the prompt positions whose keys and values are prefilled: the prefix region of
  ``decoder_causal_attention`` less its last position, whose token is fed first."""
  return jnp.maximum(jnp.sum(decoder_causal_attention > 0, axis=-1) - 1, 0).astype(jnp.int32)


def _decode_length(batch: Batch) -> int:
  for name in ('decoder_target_tokens', 'decoder_input_tokens'):
    if name in batch:
      return batch[name].shape[1]
  raise ValueError('give max_decode_length or a batch with decoder_target_tokens')
