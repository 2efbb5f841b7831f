"""The network is T5 exactly: logits match transformers' PyTorch T5 given the same weights."""

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

import hf_models  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5train import hf_interop, network  # noqa: E402


@pytest.mark.parametrize('name', sorted(hf_models.FAMILIES))
def test_logits_match_transformers(name):
  hf = hf_models.hf_model(name)
  config = hf_models.t5train_config(name)
  encoder, decoder_inputs, targets = hf_models.random_batch(config.vocab_size)
  expected = hf_models.hf_logits(hf, encoder, decoder_inputs)
  state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params = hf_interop.params_from_hf_state_dict(state_dict, config)
  logits = np.asarray(network.Transformer(config).apply(
      {'params': params}, jnp.asarray(encoder), jnp.asarray(decoder_inputs),
      jnp.asarray(targets), enable_dropout=False))
  error = hf_models.relative_error(logits, expected, targets)
  assert error < 1e-5, f'{name}: max relative error {error:.2e}'
