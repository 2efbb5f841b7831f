"""text_metrics gives the numbers the t5 package gives on the same texts, and names its metrics."""

import numpy as np
import pytest
from t5.evaluation import metrics as t5_metrics

from t5train import tasks, text_metrics
from t5train.errors import UserError

# (target, prediction): paraphrases, reordered and multi-sentence summaries (' . ' separates
# sentences for rougeLsum), exact matches, empty predictions, punctuation and case changes.
PAIRS = [
    ('the cat sat on the mat .', 'the cat sat on the mat .'),
    ('a quick brown fox jumps over the lazy dog', 'the quick brown fox jumped over a lazy dog'),
    ('The meeting was moved to Tuesday afternoon.', 'The meeting is on Tuesday.'),
    ('it rained all day . the match was cancelled . fans went home .',
     'the match was cancelled . it rained all day .'),
    ('prices rose by 3 % in march . analysts expect a further rise .',
     'analysts expect prices to rise again . they rose 3 % in march .'),
    ('Paris is the capital of France.', ''),
    ('the committee approved the budget', 'the committee approved the budget'),
    ('She sold her car, bought a bike and now cycles to work.',
     'she sold the car and cycles to work now'),
    ('scientists found water on the moon . the discovery could help future missions .',
     'water was found on the moon by scientists . future missions may benefit .'),
    ('Hello, world!', 'hello world'),
    ('the river flooded the village after three days of heavy rain',
     'heavy rain for three days flooded the village near the river'),
    ('no survivors were found', ''),
    ('the new model is faster , cheaper and more accurate than the old one .',
     'the new model is faster and cheaper .'),
]
TARGETS = [t for t, _ in PAIRS]
PREDICTIONS = [p for _, p in PAIRS]


def test_bleu_equals_t5():
  assert text_metrics.bleu(TARGETS, PREDICTIONS) == t5_metrics.bleu(TARGETS, PREDICTIONS)
  one = slice(1, 2)
  assert text_metrics.bleu(TARGETS[one], PREDICTIONS[one]) == t5_metrics.bleu(TARGETS[one],
                                                                              PREDICTIONS[one])
  assert text_metrics.bleu(TARGETS[:1], TARGETS[:1]) == {'bleu': pytest.approx(100.0)}


@pytest.mark.parametrize('seed', [0, 1, 123])
def test_rouge_equals_t5_drawing_the_same_bootstrap_samples(seed):
  np.random.seed(seed)  # t5 resamples from NumPy's global state
  expected = t5_metrics.rouge(TARGETS, PREDICTIONS)
  assert text_metrics.rouge(TARGETS, PREDICTIONS, seed=seed) == expected
  assert set(expected) == {'rouge1', 'rouge2', 'rougeLsum'}


def test_rouge_is_reproducible_and_leaves_the_global_random_state_alone():
  np.random.seed(7)
  before = np.random.get_state()[1].copy()
  first = text_metrics.rouge(TARGETS, PREDICTIONS)
  assert np.array_equal(np.random.get_state()[1], before)
  assert text_metrics.rouge(TARGETS, PREDICTIONS) == first


def test_rouge_mid_is_a_bootstrap_median_close_to_but_not_the_mean():
  # Why rouge cannot simply be the mean: T5's number is a median of resampled means.
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(['rouge1'])
  mean = 100 * np.mean([scorer.score(t, p)['rouge1'].fmeasure for t, p in PAIRS])
  reported = text_metrics.rouge(TARGETS, PREDICTIONS)['rouge1']
  assert reported != mean
  assert reported == pytest.approx(mean, abs=2.0)


def test_rouge_of_one_example_is_its_score():
  # Every resample of one example is that example, so T5's value is deterministic here.
  target, prediction = PAIRS[3]
  result = text_metrics.rouge([target], [prediction])
  assert result == t5_metrics.rouge([target], [prediction])
  # rouge1 by hand: rouge_score keeps [a-z0-9]+ tokens, so the target has 11 and the prediction
  # 8, all of them in the target: P = 8/8, R = 8/11, F = 2 * 8 / (8 + 11) = 16/19.
  assert result['rouge1'] == pytest.approx(100 * 16 / 19, rel=1e-12)


def test_exact_match_and_accuracy_equal_t5():
  expected = t5_metrics.accuracy(TARGETS, PREDICTIONS)['accuracy']
  assert text_metrics.accuracy(TARGETS, PREDICTIONS) == {'accuracy': expected}
  assert text_metrics.exact_match(TARGETS, PREDICTIONS) == {'exact_match': expected}
  assert expected == t5_metrics.sequence_accuracy(TARGETS, PREDICTIONS)['sequence_accuracy']
  assert expected == 100 * 2 / 13  # pairs 0 and 6; 'Hello, world!' vs 'hello world' differs
  assert tasks.exact_match is text_metrics.exact_match


def test_f1_equals_t5_squad():
  expected = t5_metrics.squad([[t] for t in TARGETS], PREDICTIONS)['f1']
  assert text_metrics.f1(TARGETS, PREDICTIONS)['f1'] == pytest.approx(expected, rel=1e-12)
  answers = [['Paris', 'the city of Paris'], ['1889'], ['Gustave Eiffel', 'Eiffel'], ['red']]
  predictions = ['city of paris!', 'in 1889', 'eiffel', '']
  expected = t5_metrics.squad(answers, predictions)['f1']
  assert text_metrics.f1(answers, predictions)['f1'] == pytest.approx(expected, rel=1e-12)


def test_f1_by_hand():
  # 'the cat sat' -> 'cat sat'; 'a cat sat down' -> 'cat sat down'. Common: cat, sat (2).
  # P = 2/3, R = 2/2, F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8.
  assert text_metrics.f1(['the cat sat'], ['a cat sat down']) == {'f1': pytest.approx(80.0)}
  # Case, punctuation and articles go: 'The Cat!' and 'a cat' both normalise to 'cat'.
  assert text_metrics.f1(['The Cat!'], ['a cat']) == {'f1': pytest.approx(100.0)}
  # The best of several targets counts: 'paris' scores 1 against the second; mean (1 + 0) / 2.
  assert text_metrics.f1([['london', 'Paris'], 'rome'], ['paris', 'milan']) == {
      'f1': pytest.approx(50.0)}
  # An empty prediction scores 0, as in SQuAD v1.1.
  assert text_metrics.f1(['cat'], ['']) == {'f1': 0.0}


def test_empty_lists_score_zero():
  for name, fn in text_metrics.METRICS.items():
    result = fn([], [])
    assert result and set(result.values()) == {0.0}, name


def test_unequal_lengths_are_an_error():
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    text_metrics.bleu(['a', 'b'], ['a'])


def test_metric_fns_by_name():
  assert text_metrics.metric_fns(['bleu', 'rouge']) == [text_metrics.bleu, text_metrics.rouge]
  assert text_metrics.metric_fns('f1') == [text_metrics.f1]
  with pytest.raises(UserError) as error:
    text_metrics.metric_fns(['nope'])
  assert str(error.value) == ("unknown metric 'nope'; the known metrics are "
                              'accuracy, bleu, exact_match, f1, rouge')
