"""``python -m t5train.vocab``: build a T5-style SentencePiece vocabulary from the user's text.

    python -m t5train.vocab --input='/data/corpus/*.txt' --vocab_size=32000 --output=/models/spm

writes ``/models/spm/spm.model``, ``spm.vocab`` (each piece and its score, as SentencePiece writes it) and
``vocab.gin``, which binds ``VOCABULARY`` to the model and ``network.T5Config.vocab_size`` to the
pieces plus the sentinels, rounded up to a multiple of 128. Give ``vocab.gin`` after the model's
gin file. The inputs are the files the file tasks read: text (one document a line) or JSONL
(``--text_field``), either one gzipped, read through ``file_formats``.

Memory stays bounded: documents are split into sentences and a seeded reservoir keeps at most
``--max_sentences`` of them (2,000,000 English sentences of ~120 bytes: ~250 MB of text, which
SentencePiece's unigram trainer needs several GB to learn from). The same files, flags and
``--num_threads`` give byte-identical files. It must not import TensorFlow at module level (``--help``
stays fast); it opens and globs files with ``tf.io.gfile`` so gs:// paths work.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from absl import flags

from t5train import gin_utils
from t5train.errors import UserError
from t5train.vocabulary_builder import TrainerOptions, build_vocabulary

_INPUT = flags.DEFINE_multi_string(
    'input', [], 'Glob of text (one document a line) or JSONL files, either optionally .gz; '
    'repeatable or comma-separated.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write spm.model, spm.vocab and vocab.gin '
                              'into (created if missing; files there of those names are replaced).')
_VOCAB_SIZE = flags.DEFINE_integer(
    'vocab_size', 32000, 'SentencePiece pieces, pad/EOS/UNK included, sentinels (--extra_ids) not.')
_EXTRA_IDS = flags.DEFINE_integer(
    'extra_ids', 100, 'Sentinel ids <extra_id_N> that seqio.SentencePieceVocabulary adds on top.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'The JSONL field holding the text.')
_MODEL_TYPE = flags.DEFINE_enum('model_type', 'unigram', ['unigram', 'bpe', 'char', 'word'],
                                'SentencePiece model type; T5 uses unigram.')
_CHARACTER_COVERAGE = flags.DEFINE_float(
    'character_coverage', 0.9995, 'Share of characters the vocabulary covers; rarer ones become '
    'UNK. SentencePiece\'s default, for web text; 1.0 for a small clean corpus (every character '
    'round-trips), 0.99995 for many scripts (mT5).')
_BYTE_FALLBACK = flags.DEFINE_bool(
    'byte_fallback', False, 'Spell uncovered characters as UTF-8 byte pieces instead of UNK '
    '(T5\'s vocabulary has none; 256 pieces of --vocab_size go to bytes).')
_MAX_SENTENCES = flags.DEFINE_integer(
    'max_sentences', 2_000_000, 'Sentences sampled (uniformly, with --seed) to train on; bounds memory.')
_MAX_SENTENCE_LENGTH = flags.DEFINE_integer(
    'max_sentence_length', 4192, 'Longest sentence in bytes (SentencePiece\'s default); longer ones '
    'are cut at spaces instead of being dropped.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sentence sample.')
_NUM_THREADS = flags.DEFINE_integer(
    'num_threads', 16, 'SentencePiece training threads. Unigram results depend on this number (not '
    'on the cores), so keep it fixed to reproduce a vocabulary.')
_SKIP_BAD_RECORDS = flags.DEFINE_bool(
    'skip_bad_records', False, 'Skip and count unreadable records instead of stopping at the first.')


# ---------------------------------------------------------------- the binary


def _check_flags() -> None:
  if not _INPUT.value or not _OUTPUT.value:
    raise UserError('--input and --output are required')
  if _VOCAB_SIZE.value <= 3:
    raise UserError(f'--vocab_size must be above 3 (pad, EOS and UNK), not {_VOCAB_SIZE.value}')
  if _EXTRA_IDS.value < 0:
    raise UserError(f'--extra_ids must be 0 or more, not {_EXTRA_IDS.value}')
  if not 0 < _CHARACTER_COVERAGE.value <= 1:
    raise UserError(f'--character_coverage must be in (0, 1], not {_CHARACTER_COVERAGE.value}')
  if _MAX_SENTENCE_LENGTH.value < 4:
    raise UserError(f'--max_sentence_length must be 4 bytes (one character) or more, not '
                    f'{_MAX_SENTENCE_LENGTH.value}')
  for flag in (_MAX_SENTENCES, _NUM_THREADS):
    if flag.value < 1:
      raise UserError(f'--{flag.name} must be 1 or more, not {flag.value}')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  _check_flags()
  options = TrainerOptions(
      vocab_size=_VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
      character_coverage=_CHARACTER_COVERAGE.value, byte_fallback=_BYTE_FALLBACK.value,
      max_sentence_length=_MAX_SENTENCE_LENGTH.value, num_threads=_NUM_THREADS.value)
  command = 'python -m t5train.vocab ' + shlex.join(sys.argv[1:])
  model_file = build_vocabulary(
      _INPUT.value, _OUTPUT.value, options, extra_ids=_EXTRA_IDS.value, text_field=_TEXT_FIELD.value,
      max_sentences=_MAX_SENTENCES.value, seed=_SEED.value,
      skip_bad_records=_SKIP_BAD_RECORDS.value, command=command)
  print(f'wrote {model_file}', flush=True)


def console_main() -> None:
  flags.declare_key_flag('debug')
  gin_utils.run(main, program='t5train.vocab')


if __name__ == '__main__':
  console_main()
