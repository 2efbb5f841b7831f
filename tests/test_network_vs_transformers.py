"""The network is T5 exactly: logits match transformers' PyTorch T5 given the same weights."""

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

import hf_models  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5train import decoding, hf_interop, models, network  # noqa: E402


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
  hf_models.assert_logits_close(logits, expected, targets)
  real = targets > 0
  # The whole model computed two ways agrees far inside COMPOSITE_RTOL: under 1e-5 of the
  # largest logit (the figure umT5's support was asked to meet; every family meets it).
  assert np.abs(logits[real] - expected[real]).max() < 1e-5 * np.abs(expected[real]).max()


@pytest.mark.parametrize('name', ['v1_0_relu_tied', 'v1_1_gated_gelu_untied', 'umt5'])
def test_cached_greedy_decoding_matches_transformers_generate(name):
  import torch  # noqa: PLC0415  (imported only when the test runs)
  hf = hf_models.hf_model(name)
  with torch.no_grad():  # large random weights, so that the decodes vary from step to step
    for parameter in hf.parameters():
      parameter.copy_(torch.randn_like(parameter) * 1.0)
  config = hf_models.t5train_config(name)
  encoder, _, _ = hf_models.random_batch(config.vocab_size)
  length = 12
  state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  params = hf_interop.params_from_hf_state_dict(state_dict, config)
  model = models.EncoderDecoderModel(network.Transformer(config), None, None, None,
                                     decode_fn=decoding.temperature_sample)
  ours = np.asarray(model.predict_batch(params, {'encoder_input_tokens': jnp.asarray(encoder)},
                                        decoder_params={'temperature': 0.0},
                                        max_decode_length=length))
  with torch.no_grad():
    theirs = hf.generate(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0),
                         max_new_tokens=length, do_sample=False, num_beams=1,
                         use_cache=False).numpy()  # its cache assumes equal stack depths
  theirs = theirs[:, 1:]  # drop the decoder start token
  theirs = np.pad(theirs, ((0, 0), (0, length - theirs.shape[1])))  # pad after an early EOS
  np.testing.assert_array_equal(ours, theirs)
  assert len(np.unique(ours)) > 4  # the decodes say something
