"""Span corruption: token for token T5's own preprocessor (the `t5` package), and its properties."""

import functools
import math
import os
from pydoc_data import topics

import numpy as np
import pytest
import seqio
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

from t5train import span_corruption
from t5train.errors import UserError

CHUNK_LENGTH = 65536  # T5 keeps one random chunk of this many tokens of each document
# Sentinels are the top 100 ids: 3 specials + 256 bytes + 100 = 359 ids.
BYTES = seqio.ByteVocabulary(extra_ids=100)
FIRST_SENTINEL = BYTES.vocab_size - 100
SPM = seqio.SentencePieceVocabulary(
    os.path.join(os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'),
    extra_ids=100)
LONG_AT = 5  # where the document longer than a chunk sits among the others


def _features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {'inputs': seqio.Feature(vocabulary, add_eos=True, required=False),
          'targets': seqio.Feature(vocabulary, add_eos=True)}


def _lengths(inputs_length: int, noise_density: float, mean_span: float) -> dict[str, int]:
  _, targets_length = span_corruption.random_spans_helper(inputs_length, noise_density, mean_span)
  return {'inputs': inputs_length, 'targets': targets_length}


@functools.cache
def _documents(with_long: bool, copies: int = 1) -> tuple[np.ndarray, ...]:
  """Python's documentation in bytes: 24 topics of 200 to 2,000 characters, tiny and empty ones
  (all ``copies`` times) and, ``with_long``, a document of 2.3 chunks (all topics) of which one
  chunk is kept."""
  texts = sorted(topics.topics.values(), key=len)[:48:2] + ['a', '', 'Two words.']
  documents = [np.asarray(BYTES.encode(text), np.int32) for text in texts] * copies
  if with_long:
    long_document = BYTES.encode(''.join(sorted(topics.topics.values())))[:150_000]
    documents.insert(LONG_AT, np.asarray(long_document, np.int32))
  return tuple(documents)


@functools.cache
def _run(preprocess, with_long: bool, seed: int, inputs_length: int, noise_density: float,
         mean_span: float, copies: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
  """(inputs, targets) of every example that ``preprocess`` makes of the documents."""
  documents = _documents(with_long, copies)
  dataset = tf.data.Dataset.from_generator(
      lambda: ({'targets': d} for d in documents),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.map_seed_manager(seed):
    dataset = preprocess(dataset, _lengths(inputs_length, noise_density, mean_span),
                         _features(BYTES), noise_density=noise_density,
                         mean_noise_span_length=mean_span)
  # In batches (object arrays of the examples' arrays): a third faster than one by one.
  batches = dataset.ragged_batch(4096).as_numpy_iterator()
  return [example for batch in batches for example in zip(batch['inputs'], batch['targets'])]


@pytest.mark.parametrize('with_long,inputs_length,noise_density,mean_span', [
    (True, 64, 0.15, 3.0), (False, 128, 0.3, 2.0), (False, 32, 0.5, 5.0)])
@pytest.mark.parametrize('seed', [0, 17])
def test_equals_t5s_span_corruption_token_for_token(with_long, inputs_length, noise_density,
                                                    mean_span, seed):
  setting = (with_long, seed, inputs_length, noise_density, mean_span)
  ours = _run(span_corruption.span_corruption, *setting)
  theirs = _run(t5_preprocessors.span_corruption, *setting)
  assert len(ours) == len(theirs) > 100
  for (inputs, targets), (their_inputs, their_targets) in zip(ours, theirs):
    np.testing.assert_array_equal(inputs, their_inputs)
    np.testing.assert_array_equal(targets, their_targets)


def test_batches_of_documents_give_t5s_tokens():
  """The file tasks hand over documents in batches (batched=True) of a size that does not divide
  T5's groups of 128 documents: the examples are still T5's, token for token."""
  setting = (False, 5, 64, 0.15, 3.0, 6)  # 6 copies of the documents: 162, one group and a part
  theirs = _run(t5_preprocessors.span_corruption, *setting)
  ours = _run(_in_batches(span_corruption.span_corruption), *setting)
  assert len(ours) == len(theirs) > 1000
  for (inputs, targets), (their_inputs, their_targets) in zip(ours, theirs):
    np.testing.assert_array_equal(inputs, their_inputs)
    np.testing.assert_array_equal(targets, their_targets)


def _in_batches(preprocess):
  @functools.wraps(preprocess)
  def run(dataset, *args, **kwargs):
    batches = dataset.ragged_batch(37).map(lambda batch: {'targets': batch['targets']})
    return preprocess(batches, *args, batched=True, **kwargs)
  return run


def test_regrouped_batches_keep_their_rows_in_order():
  sizes = [3, 0, 1, 9, 2, 4]  # groups of 4 straddle the batches; one batch holds two groups
  rows = [[i] * (i % 3) for i in range(sum(sizes))]  # some rows empty
  batches, start = [], 0
  for size in sizes:
    batch = rows[start:start + size]
    batches.append(tf.RaggedTensor.from_row_lengths(
        tf.constant(sum(batch, []), tf.int32), tf.constant([len(r) for r in batch], tf.int64)))
    start += size
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(batches), output_signature=tf.RaggedTensorSpec([None, None], tf.int32))
  groups = [group.to_list() for group in span_corruption._regrouped(dataset, 4)]
  assert groups == [rows[i:i + 4] for i in range(0, len(rows), 4)]
  assert [len(group) for group in groups] == [4, 4, 4, 4, 3]


@pytest.mark.parametrize('length', [1, 2, 3, 4, 7, 20, 70])
@pytest.mark.parametrize('noise_density,mean_span', [(0.15, 3.0), (0.5, 1.5), (0.3, 1.0)])
def test_noise_mask_and_sentinels_equal_t5s(length, noise_density, mean_span):
  seeds = tf.constant([[length, 7], [3, length]], tf.int64)
  mask = span_corruption.random_spans_noise_mask(length, noise_density, seeds, mean_span)
  np.testing.assert_array_equal(
      mask, t5_preprocessors.random_spans_noise_mask(length, noise_density, seeds, mean_span))
  tokens = tf.range(3, 3 + length)
  np.testing.assert_array_equal(  # the sentinels at the top of a SentencePiece vocabulary
      span_corruption.spans_to_sentinels(tokens, mask, SPM.vocab_size),
      t5_preprocessors.noise_span_to_unique_sentinel(tokens, mask, SPM, seeds=None))


def test_lengths_are_t5s():
  assert span_corruption.random_spans_helper(512, 0.15, 3.0) == (568, 114)  # T5's pretraining
  for args in [(64, 0.15, 3.0), (128, 0.3, 2.0), (32, 0.5, 5.0), (100, 0.5, 2.0)]:
    assert span_corruption.random_spans_helper(*args) == t5_preprocessors.random_spans_helper(
        *args, extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1)


def _reconstruct(inputs: np.ndarray, targets: np.ndarray) -> tuple[list[int], list[bool], list[int]]:
  """(segment, its noise mask, its noise span lengths): each sentinel of the inputs replaced by
  the tokens that follow the same sentinel in the targets."""
  spans = {}
  for token in targets:
    if token >= FIRST_SENTINEL:
      span = spans.setdefault(token, [])
    else:
      span.append(token)
  segment, is_noise, span_lengths = [], [], []
  for token in inputs:
    replaced = token >= FIRST_SENTINEL
    tokens = spans[token] if replaced else [token]
    segment += tokens
    is_noise += [replaced] * len(tokens)
    span_lengths += [len(tokens)] if replaced else []
  return segment, is_noise, span_lengths


def test_segments_sentinels_noise_density_and_span_lengths():
  # The examples of the first parity setting (with the long document): 2,000 to 2,600 of them.
  segment_length, targets_length = span_corruption.random_spans_helper(64, 0.15, 3.0)
  documents = _documents(with_long=True)
  noise_span_lengths, noise_per_position = [], np.zeros(segment_length)
  for seed in (0, 17):
    segments = []
    for inputs, targets in _run(span_corruption.span_corruption, True, seed, 64, 0.15, 3.0):
      in_sentinels, out_sentinels = inputs[inputs >= FIRST_SENTINEL], targets[targets >= FIRST_SENTINEL]
      # One sentinel per span, counting down from the top id, the same ones in inputs and targets.
      np.testing.assert_array_equal(out_sentinels, BYTES.vocab_size - 1 - np.arange(len(out_sentinels)))
      np.testing.assert_array_equal(in_sentinels, out_sentinels[:len(in_sentinels)])
      assert len(inputs) <= 64 - 1 and len(targets) <= targets_length - 1  # room for EOS
      segment, is_noise, span_lengths = _reconstruct(inputs, targets)
      segments.append(segment)
      if len(segment) == segment_length:
        # 70 tokens: round(70 x 0.15) = 10 noise tokens (10.5, to even) in round(10 / 3) = 3 spans.
        assert sum(is_noise) == 10 and len(span_lengths) == 3
        noise_span_lengths += span_lengths
        noise_per_position += is_noise
    # Together the segments are the documents, in order, the long one cut to one of its chunks.
    assert all(len(s) == segment_length for s in segments[:-1])
    rebuilt = np.concatenate(segments)
    long_document = documents[LONG_AT]
    candidates = [np.concatenate(documents[:LONG_AT] + (long_document[start:start + CHUNK_LENGTH],)
                                 + documents[LONG_AT + 1:])
                  for start in range(0, len(long_document), CHUNK_LENGTH)]
    assert sum(np.array_equal(rebuilt, c) for c in candidates) == 1
  assert len(noise_span_lengths) > 3 * 2000
  # Every split of the 10 noise tokens into 3 spans is equally likely: P(k) = C(9 - k, 1) / C(9, 2).
  frequencies = np.bincount(noise_span_lengths, minlength=9)[1:] / len(noise_span_lengths)
  np.testing.assert_allclose(frequencies, [(9 - k) / math.comb(9, 2) for k in range(1, 9)], atol=0.02)
  # Spans start after a non-noise token and may fall anywhere after it.
  assert noise_per_position[0] == 0 and np.all(noise_per_position[1:] > 0)


def test_in_a_seqio_task_inputs_fill_their_length_with_eos():
  texts = sorted(topics.topics.values(), key=len)[:40:4]
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices({'targets': texts}),
      splits=['train'])
  noising = functools.partial(span_corruption.span_corruption, noise_density=0.15,
                              mean_noise_span_length=3.0)
  task = seqio.Task('span_corruption_test', source=source, output_features=_features(BYTES),
                    preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                                   noising, seqio.preprocessors.append_eos_after_trim])
  lengths = _lengths(64, 0.15, 3.0)
  examples = list(task.get_dataset(lengths, shuffle=False, seed=3).as_numpy_iterator())
  assert len(examples) > 20
  assert {len(ex['inputs']) for ex in examples[:-1]} == {64}
  assert {len(ex['targets']) for ex in examples[:-1]} == {lengths['targets']}
  assert {ex['inputs'][-1] for ex in examples} == {ex['targets'][-1] for ex in examples} == {BYTES.eos_id}


@pytest.mark.parametrize('lengths,noise,vocabulary,message', [
    ({'inputs': 512, 'targets': 100}, {}, SPM,
     r"inputs of 512 tokens needs targets of 114; TASK_FEATURE_LENGTHS\['targets'\] is 100"),
    ({'inputs': 64, 'targets': 64}, {'noise_density': 1.5}, SPM,
     r'NOISE_DENSITY must be between 0 and 1 \(exclusive\), not 1.5'),
    ({'inputs': 64, 'targets': 64}, {'noise_density': 0.0}, SPM, 'NOISE_DENSITY must be between'),
    ({'inputs': 64, 'targets': 64}, {'mean_noise_span_length': 0.5}, SPM,
     'MEAN_NOISE_SPAN_LENGTH must be at least 1, not 0.5'),
    # 3 tokens at density 0.5: round(1.5) = 2 noise tokens in 2 spans, with 1 non-noise token to
    # put before them, where T5's mask fails in the middle of training.
    ({'inputs': 64, 'targets': 64}, {'noise_density': 0.5, 'mean_noise_span_length': 1.0}, SPM,
     'leaves a segment of 3 tokens more noise spans than non-noise tokens'),
    ({'inputs': 2048, 'targets': 456}, {}, SPM,
     'segments uses up to 114 sentinels but the vocabulary has 100 extra_ids'),
    ({'inputs': 64, 'targets': 64}, {}, seqio.ByteVocabulary(),
     'uses up to 3 sentinels but the vocabulary has 0 extra_ids'),
])
def test_bad_settings_are_user_errors(lengths, noise, vocabulary, message):
  with pytest.raises(UserError, match=message):
    span_corruption.span_corruption(tf.data.Dataset.range(0), lengths, _features(vocabulary),
                                    **noise)
