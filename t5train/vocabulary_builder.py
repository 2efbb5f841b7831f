"""Building a T5-style SentencePiece vocabulary from the user's text (``python -m t5train.vocab``).

Reads the files the file tasks read (text, one document a line, or JSONL's ``text_field``;
either gzipped) through ``file_formats``, keeps a seeded uniform sample of their sentences
(memory stays bounded: 2,000,000 English sentences of ~120 bytes are ~250 MB of text), trains
SentencePiece with T5's ids and writes ``spm.model``, ``spm.vocab`` and ``vocab.gin`` atomically.
The same files, options and ``num_threads`` give byte-identical files. No TensorFlow at module
level; files are opened and globbed with ``tf.io.gfile`` so gs:// paths work.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
from collections.abc import Iterator, Sequence

from absl import logging

from t5train import file_formats, paths
from t5train.errors import UserError

# T5's ids (seqio.SentencePieceVocabulary assumes them): pad 0, EOS 1, UNK 2, no BOS.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1
MODEL_FILE, VOCAB_FILE, GIN_FILE = 'spm.model', 'spm.vocab', 'vocab.gin'
VOCAB_SIZE_MULTIPLE = 128  # embedding rows padded as T5 does: 32,000 + 100 sentinels -> 32,128
_LOG_EVERY_BYTES = 64 << 20
_BAD_RECORDS_LOGGED = 10
# A sentence ends at ., ! or ? (or their CJK forms) followed by white space.
_SENTENCE_END = re.compile(r'(?<=[.!?\u3002\uff01\uff1f])\s+')

@dataclasses.dataclass(frozen=True)
class TrainerOptions:
  """SentencePiece's training options that a user chooses; T5's special ids are fixed."""

  vocab_size: int = 32000
  model_type: str = 'unigram'
  character_coverage: float = 0.9995
  byte_fallback: bool = False
  max_sentence_length: int = 4192  # bytes
  num_threads: int = 16


@dataclasses.dataclass
class ReadStats:
  """What the reader has seen so far, for the progress lines."""

  num_files: int = 0
  num_bytes: int = 0  # decompressed
  num_lines: int = 0
  num_bad_records: int = 0


# ---------------------------------------------------------------- reading and sampling


def split_sentences(text: str, max_bytes: int) -> list[str]:
  """The sentences of a document, each at most ``max_bytes`` UTF-8 bytes.

  Pieces never span white space, so cutting there loses nothing the trainer could learn, and a
  sample of sentences covers more documents than a sample of whole documents in the same memory.
  A sentence over the limit is cut at its last space before it (mid-character never).
  """
  if max_bytes < 4:
    raise ValueError(f'max_bytes must hold the longest UTF-8 character (4 bytes), not {max_bytes}')
  sentences = []
  for sentence in _SENTENCE_END.split(text.strip()):
    encoded = sentence.encode('utf-8')
    while len(encoded) > max_bytes:
      cut = encoded.rfind(b' ', 1, max_bytes + 1)
      if cut <= 0:
        cut = max_bytes
        while encoded[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to the character start
          cut -= 1
      sentences.append(encoded[:cut].decode('utf-8'))
      encoded = encoded[cut:].lstrip()
    if encoded:
      sentences.append(encoded.decode('utf-8'))
  return sentences


def read_texts(files: Sequence[str], text_field: str, skip_bad_records: bool,
               stats: ReadStats) -> Iterator[str]:
  """The text of each non-blank record of ``files``, in order; a bad record is a UserError
  (``path:line: ...``) unless ``skip_bad_records``, when it is counted in ``stats``."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def skip_or_raise(error: file_formats.RecordError) -> None:
    if not skip_bad_records:
      raise UserError(str(error)) from None
    stats.num_bad_records += 1
    if stats.num_bad_records <= _BAD_RECORDS_LOGGED:
      logging.warning('Skipped a bad record: %s', error)

  for path in files:
    fmt = file_formats.file_format(path)
    if fmt not in (file_formats.TEXT, file_formats.JSONL):
      raise UserError(f'{path}: t5train.vocab reads text and JSONL files, not {fmt} (told by the '
                      'file name)')
    columns = file_formats.resolve_columns(path, fmt, [text_field], None)
    stats.num_files += 1
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        for number, raw in enumerate(file_formats.open_lines(f, path), start=1):
          stats.num_lines += 1
          stats.num_bytes += len(raw)
          if not raw.strip():
            continue
          try:
            yield from file_formats.parse_line(raw, path, number, fmt, columns)
          except file_formats.RecordError as e:
            skip_or_raise(e)
    except file_formats.RecordError as e:  # a gzip stream cut short: the rest of the file is lost
      skip_or_raise(e)
    except (OSError, tf.errors.OpError) as e:
      raise UserError(f'{path}: cannot read ({e})') from None


class Reservoir:
  """A uniform sample of at most ``size`` items of a stream of unknown length (Algorithm R)."""

  def __init__(self, size: int, rng: random.Random) -> None:
    self.size = size
    self.items: list[str] = []
    self.num_seen = 0
    self._rng = rng

  def add(self, item: str) -> None:
    self.num_seen += 1
    if len(self.items) < self.size:
      self.items.append(item)
      return
    slot = self._rng.randrange(self.num_seen)  # item n is kept with probability size / n
    if slot < self.size:
      self.items[slot] = item


def sample_sentences(patterns: str | Sequence[str], *, text_field: str = 'text',
                     max_sentences: int = 2_000_000, max_sentence_length: int = 4192, seed: int = 0,
                     skip_bad_records: bool = False, log_every_bytes: int = _LOG_EVERY_BYTES
                     ) -> list[str]:
  """A seeded uniform sample of the sentences of the files the globs match, logging progress."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Each --input may itself hold comma-separated globs.
  patterns = [p for given in file_formats.as_patterns(patterns) for p in file_formats.as_patterns(given)]
  files = file_formats.expand_patterns(patterns, tf.io.gfile.glob, '--input')
  logging.info('Sampling up to %d sentences from %d file(s).', max_sentences, len(files))
  stats = ReadStats()
  reservoir = Reservoir(max_sentences, random.Random(seed))
  next_log = log_every_bytes
  for text in read_texts(files, text_field, skip_bad_records, stats):
    for sentence in split_sentences(text, max_sentence_length):
      reservoir.add(sentence)
    if stats.num_bytes >= next_log:
      next_log += log_every_bytes
      _log_progress(stats, reservoir)
  _log_progress(stats, reservoir)
  if stats.num_bad_records:
    logging.warning('Skipped %d bad record(s).', stats.num_bad_records)
  if not reservoir.items:
    raise UserError(f'--input: the {len(files)} file(s) matched hold no text')
  return reservoir.items


def _log_progress(stats: ReadStats, reservoir: Reservoir) -> None:
  logging.info('Read %.1f MB, %d lines of %d file(s): %d sentences, %d sampled.',
               stats.num_bytes / 1e6, stats.num_lines, stats.num_files, reservoir.num_seen,
               len(reservoir.items))


# ---------------------------------------------------------------- training


def train_sentencepiece(sentences: Sequence[str], options: TrainerOptions) -> tuple[bytes, bytes]:
  """SentencePiece model and vocab file contents trained on ``sentences`` with T5's ids."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.set_random_generator_seed(0)  # SentencePiece samples only with input_sentence_size; fixed anyway
  model = io.BytesIO()  # not model_prefix: the model would record that (temporary) path
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=options.vocab_size, model_type=options.model_type,
        character_coverage=options.character_coverage, byte_fallback=options.byte_fallback,
        max_sentence_length=options.max_sentence_length, num_threads=options.num_threads,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        input_sentence_size=0)  # we sampled already: train on every sentence given
  except RuntimeError as e:  # e.g. "Vocabulary size is too big. Please set it to a value <= N."
    message = ' '.join(str(e).split())
    raise UserError(f'SentencePiece cannot train this vocabulary: {message}') from None
  return model.getvalue(), vocab_file_text(model.getvalue()).encode('utf-8')


def vocab_file_text(model: bytes) -> str:
  """What SentencePiece writes to ``PREFIX.vocab``: each piece and its score (%g, 6 digits)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto.FromString(model)
  return ''.join(f'{piece.piece}\t{piece.score:.6g}\n' for piece in proto.pieces)


# ---------------------------------------------------------------- writing


def model_vocab_size(vocab_size: int, extra_ids: int) -> int:
  """The model's embedding rows: pieces + sentinels, rounded up to a multiple of 128."""
  return -(-(vocab_size + extra_ids) // VOCAB_SIZE_MULTIPLE) * VOCAB_SIZE_MULTIPLE


def vocab_gin_text(model_file: str, vocab_size: int, extra_ids: int, command: str) -> str:
  """``vocab.gin``: binds VOCABULARY to ``model_file`` and the model's vocab size to match."""
  command = ' '.join(command.split())  # one comment line, whatever the arguments held
  return '\n'.join([
      f'# Written by t5train.vocab: {command}',
      '#',
      '# Give it after the model\'s gin file, so that its bindings win:',
      '#   python -m t5train.train --gin_file=gin/models/t5_1_1/small.gin ... '
      f'--gin_file={os.path.join(os.path.dirname(model_file), GIN_FILE)}',
      'from __gin__ import dynamic_registration',
      'import seqio',
      'from t5train import network',
      '',
      'VOCABULARY = @seqio.SentencePieceVocabulary()',
      f'seqio.SentencePieceVocabulary.sentencepiece_model_file = {model_file!r}',
      f'seqio.SentencePieceVocabulary.extra_ids = {extra_ids}',
      f'network.T5Config.vocab_size = {model_vocab_size(vocab_size, extra_ids)}  '
      f'# {vocab_size:,} pieces + {extra_ids} sentinels, rounded up to a multiple of '
      f'{VOCAB_SIZE_MULTIPLE}',
  ]) + '\n'


def write_vocabulary(output: str, model: bytes, vocab: bytes, vocab_size: int, extra_ids: int,
                     command: str) -> str:
  """Writes spm.model, spm.vocab and vocab.gin into ``output``; returns the model's path."""
  directory = paths.resolve(output)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except  (OSError locally, TF's errors on gs://)
    raise UserError(f'--output {output}: cannot create the directory ({e})') from None
  model_file = paths.join(directory, MODEL_FILE)
  paths.write_bytes_atomically(model_file, model)
  paths.write_bytes_atomically(paths.join(directory, VOCAB_FILE), vocab)
  paths.write_text_atomically(paths.join(directory, GIN_FILE),
                              vocab_gin_text(model_file, vocab_size, extra_ids, command))
  return model_file


def build_vocabulary(patterns: str | Sequence[str], output: str, options: TrainerOptions, *,
                     extra_ids: int = 100, text_field: str = 'text', max_sentences: int = 2_000_000,
                     seed: int = 0, skip_bad_records: bool = False, command: str = '') -> str:
  """Samples the files' sentences, trains on them and writes the vocabulary; returns spm.model."""
  sentences = sample_sentences(patterns, text_field=text_field, max_sentences=max_sentences,
                               max_sentence_length=options.max_sentence_length, seed=seed,
                               skip_bad_records=skip_bad_records)
  logging.info('Training a %s vocabulary of %d pieces on %d sentences.', options.model_type,
               options.vocab_size, len(sentences))
  model, vocab = train_sentencepiece(sentences, options)
  del sentences
  model_file = write_vocabulary(output, model, vocab, options.vocab_size, extra_ids, command)
  logging.info('Wrote %s: %d pieces + %d sentinels = %d ids; the model\'s vocab_size is %d.',
               model_file, options.vocab_size, extra_ids, options.vocab_size + extra_ids,
               model_vocab_size(options.vocab_size, extra_ids))
  return model_file
