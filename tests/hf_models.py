"""Randomly initialised transformers T5 models of each supported family (never downloaded)."""

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from t5train import network, testing

VOCAB = 96
# name -> (transformers config kwargs, t5train mlp activations, tied output layer)
FAMILIES = {
    'v1_0_relu_tied': (dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj='relu'),
                       ('relu',), True),
    'v1_1_gated_gelu_untied': (dict(d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                    feed_forward_proj='gated-gelu'), ('gelu', 'linear'), False),
    'mt5': (dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj='gated-gelu',
                 model_type='mt5'), ('gelu', 'linear'), False),
    'byt5': (dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj='gated-gelu',
                  vocab_size=384), ('gelu', 'linear'), False),
    # Odd shapes here too: d_model 40 != 4 heads x 8, depths 2 and 3 (see hf_model).
    'umt5': (dict(d_model=40, d_kv=8, num_heads=4, d_ff=56, feed_forward_proj='gated-gelu',
                  model_type='umt5', relative_attention_num_buckets=24,
                  relative_attention_max_distance=40), ('gelu', 'linear'), False),
    'd_model_not_heads_times_kv_small_buckets': (
        dict(d_model=48, d_kv=8, num_heads=3, d_ff=40, feed_forward_proj='gated-gelu',
             relative_attention_num_buckets=16, relative_attention_max_distance=20),
        ('gelu', 'linear'), False),
}


# Tied output layers as transformers 5 builds and saves them: config.json says
# tie_word_embeddings=true and the file holds no lm_head.weight. name -> (the FAMILIES entry whose
# dimensions it takes, the tie_word_embeddings given to its config, whether the logits scale the
# decoder's output by d_model**-0.5). transformers 5 turns a False into unscaled logits of the
# tied embedding (scale_decoder_outputs=false) and never scales mT5's; t5train's tied output layer
# scales, so an unscaled one is an untied copy of the embedding there.
TIED = {
    'umt5_tied': ('umt5', True, True),
    'umt5_tie_word_embeddings_false': ('umt5', False, False),
    'mt5_tied': ('mt5', True, False),
}


def _family(name: str) -> tuple[dict, tuple[str, ...], bool, bool]:
  """(transformers config kwargs, t5train activations, tie_word_embeddings given to the config,
  t5train's logits_via_embedding) of a FAMILIES or TIED name."""
  if name in TIED:
    base, tie, scaled = TIED[name]
    kwargs, activations, _ = FAMILIES[base]
    return kwargs, activations, tie, scaled
  kwargs, activations, tied = FAMILIES[name]
  return kwargs, activations, tied, tied


def hf_model(name: str) -> transformers.PreTrainedModel:
  kwargs, _, tie, _ = _family(name)
  kwargs = dict(kwargs)
  model_type = kwargs.pop('model_type', 't5')
  vocab = kwargs.pop('vocab_size', VOCAB)
  config_cls, model_cls = {
      't5': (transformers.T5Config, transformers.T5ForConditionalGeneration),
      'mt5': (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
      'umt5': (transformers.UMT5Config, transformers.UMT5ForConditionalGeneration)}[model_type]
  torch.manual_seed(0)
  config = config_cls(vocab_size=vocab, num_layers=2, num_decoder_layers=3, dropout_rate=0.0,
                      layer_norm_epsilon=1e-6, tie_word_embeddings=tie, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, **kwargs)
  model = model_cls(config).eval()
  if name in FAMILIES and not tie:  # T5 v1.1: shared input embedding, separate output layer
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, kwargs['d_model']) * 0.2)
  with torch.no_grad():  # larger relative-position biases, so a wrong bucket shows in the logits
    for stack in (model.encoder, model.decoder):
      for block in stack.block:  # umT5 has a table in every layer, the others in the first
        attention = block.layer[0].SelfAttention
        if getattr(attention, 'has_relative_attention_bias', False):
          bias = attention.relative_attention_bias.weight
          bias.copy_(torch.randn_like(bias))
  return model


def t5train_config(name: str) -> network.T5Config:
  kwargs, activations, _, logits_via_embedding = _family(name)
  return network.T5Config(
      vocab_size=kwargs.get('vocab_size', VOCAB), dtype=jnp.float32, emb_dim=kwargs['d_model'],
      num_heads=kwargs['num_heads'], num_encoder_layers=2, num_decoder_layers=3,
      head_dim=kwargs['d_kv'], mlp_dim=kwargs['d_ff'], mlp_activations=activations,
      dropout_rate=0.0, logits_via_embedding=logits_via_embedding,
      relative_attention_num_buckets=kwargs.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=kwargs.get('relative_attention_max_distance', 128),
      relative_attention_per_layer=kwargs.get('model_type') == 'umt5')


def random_batch(vocab: int, seed: int = 0, batch: int = 3, enc_len: int = 40, dec_len: int = 24
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(encoder tokens, decoder inputs, targets) with trailing padding of three lengths."""
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, vocab, (batch, enc_len))
  targets = rng.integers(2, vocab, (batch, dec_len))
  for row, (e, d) in enumerate([(enc_len, dec_len), (25, 10), (7, 3)][:batch]):
    encoder[row, e:] = 0
    targets[row, d:] = 0
  decoder_inputs = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  return encoder, decoder_inputs, targets


def hf_logits(model, encoder, decoder_inputs) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(encoder), attention_mask=torch.tensor(encoder > 0),
                 decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, targets: np.ndarray) -> None:
  """t5train's logits against another implementation's, at real (non-padding) target positions."""
  real = targets > 0
  testing.assert_trees_close(actual[real], expected[real])
