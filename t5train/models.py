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
               optimizer_def: Any, decode_fn: Callable[..., Any] = decoding.greedy_decode,
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

  def predict_batch(self, params: Any, batch: Batch, max_decode_length: int | None = None) -> Array:
    """Decoded target tokens [batch, length] from ``decode_fn``, starting from BOS (id 0)."""
    length = max_decode_length or batch['decoder_target_tokens'].shape[1]
    encoded = self.module.apply({'params': params}, batch['encoder_input_tokens'],
                                enable_dropout=False, method=self.module.encode)
    step_logits_fn = functools.partial(self._decoder_logits, params, encoded,
                                       batch['encoder_input_tokens'])
    eos_id = getattr(self.output_vocabulary, 'eos_id', 1)
    return self.decode_fn(step_logits_fn, batch['encoder_input_tokens'].shape[0], length,
                          eos_id=eos_id)

  def _decoder_logits(self, params: Any, encoded: Array, encoder_tokens: Array,
                      decoder_input_tokens: Array) -> Array:
    # Every decoded position counts as a real token (target id 1 stands for "non-padding").
    return self.module.apply({'params': params}, encoded, encoder_tokens, decoder_input_tokens,
                             jnp.ones_like(decoder_input_tokens), enable_dropout=False,
                             method=self.module.decode)

