"""Text metrics by name, computed as the ``t5`` package computes them, for seqio tasks and gin's METRICS.

Each metric takes ``(targets, predictions)``, lists of strings with one entry per example, and
returns ``{name: value}`` with values in percent (BLEU on sacrebleu's 0-100 scale), so numbers
reported here can be set beside published T5 numbers. An empty evaluation set scores 0.

This module must stay free of TensorFlow, seqio and JAX (NumPy only). sacrebleu and rouge_score are
imported inside the functions that use them (rouge_score pulls in nltk, which takes seconds).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from t5train.errors import UserError

MetricFn = Callable[..., dict[str, float]]

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeLsum')
# rouge_score's BootstrapAggregator defaults, which T5 uses.
_BOOTSTRAP_SAMPLES = 1000
_BOOTSTRAP_SEED = 0
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = frozenset(string.punctuation)


def _check_lengths(targets: Sequence[object], predictions: Sequence[object]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')


def _percent_equal(targets: Sequence[str], predictions: Sequence[str]) -> float:
  _check_lengths(targets, predictions)
  if not targets:
    return 0.0
  matches = sum(t == p for t, p in zip(targets, predictions))
  # 100 * (matches / n), in this order, is sklearn's accuracy_score x 100 to the last bit.
  return 100 * (matches / len(targets))


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target string (no normalisation)."""
  return {'exact_match': _percent_equal(targets, predictions)}


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """T5's classification accuracy: the percentage of predictions equal to their target."""
  return {'accuracy': _percent_equal(targets, predictions)}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """sacrebleu's corpus BLEU with one reference per example, with T5's settings: the international
  tokeniser, exponential smoothing, case kept, no effective order."""
  _check_lengths(targets, predictions)
  if not targets:
    return {'bleu': 0.0}
  import sacrebleu  # lazy, like rouge_score below

  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method='exp',
                                smooth_value=0.0, force=False, lowercase=False, tokenize='intl',
                                use_effective_order=False)
  return {'bleu': score.score}


def _sentence_per_line(summary: str) -> str:
  """T5's preparation for rougeLsum, which splits summaries into sentences at newlines."""
  return summary.replace(' . ', ' .\n')


def rouge(targets: Sequence[str], predictions: Sequence[str], seed: int = _BOOTSTRAP_SEED
          ) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures x 100, as ``t5.evaluation.metrics.rouge`` reports them.

  T5 aggregates with rouge_score's ``BootstrapAggregator`` and reports its ``mid`` value. Despite
  the comment in rouge_score that mid "is always the mean", it is the median (50th percentile) of
  1,000 bootstrap means, each over n examples drawn with replacement, so it is not the mean of
  the per-example scores. T5 draws the samples from NumPy's global random state, unseeded, so
  T5's own number changes from run to run (on the 13 pairs of tests/test_text_metrics.py, by a
  standard deviation of 0.3-0.4 points, up to 1.2 points from the mean). Here the same
  resampling draws from a private ``RandomState(seed)``: the result is reproducible, leaves the
  global state alone, and equals T5's exactly when T5 runs right after ``np.random.seed(seed)``
  (the draws go in the same order: 1,000 for rouge1, then rouge2, then rougeLsum). With a single
  example every resample is that example, so mid is its score.
  """
  _check_lengths(targets, predictions)
  if not targets:
    return dict.fromkeys(ROUGE_TYPES, 0.0)
  from rouge_score import rouge_scorer  # lazy: it imports nltk, which takes seconds

  scorer = rouge_scorer.RougeScorer(rouge_types=list(ROUGE_TYPES))
  per_example = [scorer.score(target=_sentence_per_line(t), prediction=_sentence_per_line(p))
                 for t, p in zip(targets, predictions)]
  rng = np.random.RandomState(seed)
  result = {}
  for rouge_type in ROUGE_TYPES:  # the order of T5's draws
    # [examples, 3]: precision, recall, fmeasure, averaged together as rouge_score does.
    scores = np.vstack([example[rouge_type] for example in per_example])
    result[rouge_type] = 100 * float(_bootstrap_median_of_means(scores, rng)[2])
  return result


def _bootstrap_median_of_means(scores: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
  """[measures]: the median over resamples of the resample's mean, drawn as rouge_score draws."""
  num_examples = scores.shape[0]
  means = np.zeros((_BOOTSTRAP_SAMPLES, scores.shape[1]))
  for i in range(_BOOTSTRAP_SAMPLES):
    sample = rng.choice(np.arange(num_examples), size=num_examples)
    means[i, :] = np.mean(scores[sample, :], axis=0)
  return np.percentile(means, 50, axis=0)


def _normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, drop punctuation, then articles, then extra whitespace."""
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def _token_f1(target: str, prediction: str) -> float:
  """F1 of the bags of words of two normalised strings; 0 when either is empty (SQuAD v1.1)."""
  target_tokens, prediction_tokens = target.split(), prediction.split()
  num_common = sum((collections.Counter(target_tokens) & collections.Counter(prediction_tokens)
                    ).values())
  if num_common == 0:
    return 0.0
  precision = num_common / len(prediction_tokens)
  recall = num_common / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD's token F1 x 100, the mean over examples; an example may list several acceptable
  targets, and scores its best (T5's ``squad`` 'f1')."""
  _check_lengths(targets, predictions)
  if not targets:
    return {'f1': 0.0}
  total = 0.0
  for answers, prediction in zip(targets, predictions):
    answers = [answers] if isinstance(answers, str) else answers
    prediction = _normalize_answer(prediction)
    total += max((_token_f1(_normalize_answer(a), prediction) for a in answers), default=0.0)
  return {'f1': 100 * (total / len(targets))}


METRICS: dict[str, MetricFn] = {
    'accuracy': accuracy,
    'bleu': bleu,
    'exact_match': exact_match,
    'f1': f1,
    'rouge': rouge,
}


def metric_fns(names: Sequence[str]) -> list[MetricFn]:
  """The metric functions for names from METRICS (a single name may be given as a string), so a
  gin file can say ``METRICS = ['bleu', 'rouge']``."""
  names = [names] if isinstance(names, str) else list(names)
  unknown = [name for name in names if name not in METRICS]
  if unknown:
    raise UserError(f'unknown metric {", ".join(map(repr, unknown))}; the known metrics are '
                    f'{", ".join(sorted(METRICS))}')
  return [METRICS[name] for name in names]
