"""EncoderDecoderModel: the network plus its loss, metrics, initialisation and decoding.

Holds no training state and does no I/O. seqio is imported lazily (only for
``FEATURE_CONVERTER_CLS``) so that the model runs where TensorFlow is absent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import clu.metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp

from t5train import decoding, losses

Array = jax.Array
Batch = Mapping[str, Array]
Metrics = dict[str, clu_metrics.Metric]


class _SeqioEncDecFeatureConverter:
  """Resolves to ``seqio.EncDecFeatureConverter`` on first access."""

  def __get__(self, obj: Any, owner: type) -> type:
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.EncDecFeatureConverter


class EncoderDecoderModel:
  """A T5-style encoder-decoder with T5X's constructor and method names."""

  FEATURE_CONVERTER_CLS = _SeqioEncDecFeatureConverter()

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
                  'num_positions': jnp.asarray(counted.size, jnp.float32)}

  @staticmethod
  def metrics(sums: dict[str, Array]) -> Metrics:
    """T5X-named clu metrics of one step from the sums of ``loss_fn``."""
    one = jnp.ones((), jnp.int32)
    average = clu_metrics.Average
    return {
        'loss': average(total=sums['loss'], count=one),
        'cross_ent_loss': average(total=sums['loss'] - sums['z_loss'], count=one),
        'z_loss': average(total=sums['z_loss'], count=one),
        'cross_ent_loss_per_all_target_tokens': average(total=sums['per_token_cross_ent_sum'],
                                                        count=sums['num_tokens']),
        'accuracy': average(total=sums['num_correct'], count=sums['num_tokens']),
        'non_padding_fraction/loss_weights': average(total=sums['num_tokens'],
                                                     count=sums['num_positions']),
    }

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

  def predict_batch(self, params: Any, batch: Batch, rng: Array | None = None,
                    decoder_params: Mapping[str, Any] | None = None,
                    max_decode_length: int | None = None) -> Array:
    """The best decode of each example [batch, length] (0 after EOS)."""
    return self.predict_batch_with_aux(params, batch, rng, decoder_params,
                                       max_decode_length=max_decode_length)[0]

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
    decoder_params = dict(decoder_params or {})
    if num_decodes is not None:
      decoder_params['num_decodes'] = num_decodes
    length = max_decode_length or _decode_length(batch)
    inputs = batch['encoder_input_tokens']
    encoded = self.module.apply({'params': params}, inputs, enable_dropout=False,
                                method=self.module.encode)
    cache = self._initial_cache(params, encoded, inputs, length)
    tokens_to_logits = functools.partial(self._decode_step, params, encoded, inputs, length)
    eos_id = getattr(self.output_vocabulary, 'eos_id', 1)
    decodes, scores = self.decode_fn(tokens_to_logits, cache, inputs.shape[0], length, eos_id,
                                     decode_rng=rng, **decoder_params)
    if return_all_decodes:
      return decodes, {'scores': scores}
    return decodes[:, 0], {'scores': scores[:, 0]}

  def _initial_cache(self, params: Any, encoded: Array, encoder_tokens: Array,
                     length: int) -> Any:
    """Empty self-attention caches of ``length`` positions and the projected encoder outputs."""
    placeholder = jnp.zeros((encoded.shape[0], length), jnp.int32)
    _, variables = self.module.apply(
        {'params': params}, encoded, encoder_tokens, placeholder, enable_dropout=False,
        decode=True, max_decode_length=length, method=self.module.decode, mutable=['cache'])
    return variables['cache']

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


def _decode_length(batch: Batch) -> int:
  for name in ('decoder_target_tokens', 'decoder_input_tokens'):
    if name in batch:
      return batch[name].shape[1]
  raise ValueError('give max_decode_length or a batch with decoder_target_tokens')
