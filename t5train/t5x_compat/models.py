"""``t5x.models``: T5X's model classes (constructor names and defaults) on t5train's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from t5train import models as _models
from t5train.models import BaseTransformerModel, DecoderOnlyModel  # noqa: F401
from t5train.t5x_compat import decoding
from t5train.t5x_compat._args import require


class EncoderDecoderModel(_models.EncoderDecoderModel):
  """T5X's ``EncoderDecoderModel``: as t5train's, with T5X's default decoding (beam search,
  4 beams, alpha 0.6) and its ``feature_converter_cls``; ``default_decoder_params`` is refused
  (bind the decode function's settings instead)."""

  def __init__(self, module: Any, input_vocabulary: Any, output_vocabulary: Any,
               optimizer_def: Any, decode_fn: Callable[..., Any] = decoding.beam_search,
               feature_converter_cls: Callable[..., Any] | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: Any = None, default_decoder_params: Any = None):
    require('EncoderDecoderModel.default_decoder_params', default_decoder_params, None,
            "bind the decode function's settings, e.g. decoding.beam_search.alpha")
    if feature_converter_cls is not None:
      self.FEATURE_CONVERTER_CLS = feature_converter_cls  # pylint: disable=invalid-name
    super().__init__(module, input_vocabulary, output_vocabulary, optimizer_def,
                     decode_fn=decode_fn, z_loss=z_loss, label_smoothing=label_smoothing,
                     loss_normalizing_factor=loss_normalizing_factor)


__all__ = ['BaseTransformerModel', 'DecoderOnlyModel', 'EncoderDecoderModel']
