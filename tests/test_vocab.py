"""t5train.vocab: a SentencePiece vocabulary with T5's ids, readable by seqio, gin and Hugging Face.

The corpus is the language reference that every Python ships (pydoc_data.topics, ~450 KB of
English), half as a text file and half as gzipped JSONL. The binary runs once in a subprocess;
the other checks call the module's functions in-process to spare start-up time.
"""

import gzip
import json
import os
import random
import shutil
from pydoc_data.topics import topics

import pytest
import sentencepiece as spm
import seqio
from binaries import run_binary

import gin
from t5train import gin_utils
from t5train import vocabulary_builder as vocab
from t5train.errors import UserError

VOCAB_SIZE = 400
OPTIONS = vocab.TrainerOptions(vocab_size=VOCAB_SIZE, character_coverage=1.0, num_threads=2)
SENTENCES = ['The return statement leaves the current function call.',
             'Hello   world,  x = 3 ** 2!', 'A "for" loop iterates over <extra_id_0> a sequence.']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(directory, lines): docs.txt and docs.jsonl.gz, each holding half of the topics' lines."""
  directory = tmp_path_factory.mktemp('corpus')
  documents = list(topics.values())
  text_lines = [line for doc in documents[::2] for line in doc.splitlines()]  # blank lines kept
  json_lines = [line for doc in documents[1::2] for line in doc.splitlines() if line.strip()]
  (directory / 'docs.txt').write_text('\n'.join(text_lines) + '\n', encoding='utf-8')
  with gzip.open(directory / 'docs.jsonl.gz', 'wt', encoding='utf-8') as f:
    f.writelines(json.dumps({'text': line, 'id': i}) + '\n' for i, line in enumerate(json_lines))
  return directory, [line for line in text_lines + json_lines if line.strip()]


@pytest.fixture(scope='module')
def built(corpus):
  """The binary's output directory, built from both files (a comma-separated pair of globs)."""
  directory, _ = corpus
  output = directory / 'spm'
  result = run_binary('t5train.vocab', f'--input={directory}/*.txt,{directory}/*.jsonl.gz',
                      f'--vocab_size={VOCAB_SIZE}', '--character_coverage=1.0', '--num_threads=2',
                      f'--output={output}')
  assert result.returncode == 0, result.stderr[-3000:]
  return output, result


def test_binary_writes_a_t5_vocabulary(built):
  output, result = built
  assert sorted(os.listdir(output)) == ['spm.model', 'spm.vocab', 'vocab.gin']  # no temp files left
  assert 'sampled' in result.stderr and 'the model\'s vocab_size is 512' in result.stderr
  sp = spm.SentencePieceProcessor(model_file=str(output / 'spm.model'))
  assert sp.get_piece_size() == VOCAB_SIZE
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  assert seqio.SentencePieceVocabulary(str(output / 'spm.model'), extra_ids=100).vocab_size == 500


def test_vocab_gin_binds_the_vocabulary_and_the_model_size(built):
  output, _ = built
  text = (output / 'vocab.gin').read_text()
  assert "sentencepiece_model_file = '" + str(output / 'spm.model') + "'" in text  # absolute
  gin.clear_config()  # another test in this worker may have left a locked config
  try:
    gin_utils.parse_gin(['models/t5_1_1/tiny.gin', str(output / 'vocab.gin')], [])
    assert gin.query_parameter('network.T5Config.vocab_size') == 512  # 400 + 100 -> 512
    vocabulary = gin.query_parameter('%VOCABULARY').scoped_configurable_fn()
    assert vocabulary.sentencepiece_model_file == str(output / 'spm.model')
    assert vocabulary.vocab_size == VOCAB_SIZE + 100
  finally:
    gin.clear_config()
  assert vocab.model_vocab_size(32000, 100) == 32128 and vocab.model_vocab_size(28, 100) == 128


def test_decode_encode_gives_the_training_lines_back_normalized(built, corpus):
  """SentencePiece normalises (NFKC, runs of white space to one space, none at the ends), so a
  line comes back as ``normalize`` gives it; with character_coverage=1.0 nothing becomes UNK."""
  output, _ = built
  sp = spm.SentencePieceProcessor(model_file=str(output / 'spm.model'))
  vocabulary = seqio.SentencePieceVocabulary(str(output / 'spm.model'), extra_ids=100)
  normalized = lambda line: sp.normalize(line).replace('\u2581', ' ').removeprefix(' ')
  lines = corpus[1]
  assert [vocabulary.decode(vocabulary.encode(line)) for line in lines] == list(map(normalized, lines))
  assert 2 not in {i for line in lines for i in sp.encode(line)}


def test_hugging_face_t5_tokenizer_gives_seqio_ids(built, tmp_path, monkeypatch):
  """transformers 5's T5Tokenizer is the `tokenizers` one: ``T5Tokenizer(vocab_file=...)`` ignores
  the file (it builds a placeholder vocabulary), so load the directory, with the file named
  spiece.model as Hugging Face names it; it converts the model offline."""
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  T5Tokenizer = pytest.importorskip('transformers').T5Tokenizer
  output, _ = built
  shutil.copy(output / 'spm.model', tmp_path / 'spiece.model')
  tokenizer = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
  vocabulary = seqio.SentencePieceVocabulary(str(output / 'spm.model'), extra_ids=100)
  assert len(tokenizer) == vocabulary.vocab_size == VOCAB_SIZE + 100
  for sentence in SENTENCES:
    assert tokenizer(sentence)['input_ids'] == list(vocabulary.encode(sentence)) + [1]  # + EOS
  sentinel = VOCAB_SIZE + 100 - 1
  assert tokenizer.convert_tokens_to_ids('<extra_id_0>') == sentinel
  assert list(vocabulary.encode('<extra_id_0>')) == [sentinel]


def test_same_input_and_seed_give_identical_bytes(built, corpus, tmp_path):
  """A build in this process equals the binary's (same files and flags): SentencePiece is
  deterministic for a given num_threads (unigram pieces change with it, so the flag has a fixed
  default rather than the number of cores)."""
  directory, _ = corpus
  vocab.build_vocabulary([f'{directory}/docs.txt', f'{directory}/docs.jsonl.gz'], str(tmp_path), OPTIONS)
  for name in ('spm.model', 'spm.vocab'):
    assert (tmp_path / name).read_bytes() == (built[0] / name).read_bytes(), name


def test_sample_is_seeded_and_bounded(corpus):
  directory, lines = corpus
  pattern = f'{directory}/docs.*'
  sample = lambda seed: vocab.sample_sentences(pattern, max_sentences=500, seed=seed)
  first, again, other = sample(0), sample(0), sample(1)
  assert len(first) == 500 and first == again and first != other
  everything = vocab.sample_sentences(pattern, max_sentences=10**6)
  assert set(first) <= set(everything)
  assert len(everything) >= len(lines)  # lines split into sentences


def test_reservoir_is_uniform():
  counts = [0] * 10
  rng = random.Random(0)
  for _ in range(2000):
    reservoir = vocab.Reservoir(3, rng)
    for item in range(10):
      reservoir.add(item)
    for item in reservoir.items:
      counts[item] += 1
  assert all(abs(count - 600) < 90 for count in counts), counts  # 2000 x 3/10, ~5 sigma


def test_split_sentences_cuts_at_spaces_within_the_byte_limit():
  assert vocab.split_sentences('One. Two!  Three? e.g.x  four', 100) == [
      'One.', 'Two!', 'Three?', 'e.g.x  four']
  words = 'lorem ipsum dolor sit amet ' * 20
  pieces = vocab.split_sentences(words, 30)
  assert all(len(p.encode()) <= 30 for p in pieces) and ' '.join(pieces).split() == words.split()
  unbroken = 'é' * 25  # 50 bytes, no space: cut between characters, never inside one
  assert vocab.split_sentences(unbroken, 7) == ['ééé'] * 8 + ['é']


def _write(path, data):
  path.write_bytes(gzip.compress(data) if path.name.endswith('.gz') else data)
  return str(path)


@pytest.mark.parametrize('name,data,message', [
    ('bad.jsonl', b'{"text": "fine"}\n{"text": \n', 'bad.jsonl:2: invalid JSON'),
    ('bad.jsonl', b'{"text": "fine"}\n{"body": "x"}\n', "bad.jsonl:2: no field 'text'"),
    ('bad.txt', b'fine\n\xff\xfe\n', 'bad.txt:2: not UTF-8'),
])
def test_bad_records_are_user_errors_or_skipped(tmp_path, name, data, message):
  path = _write(tmp_path / name, data)
  with pytest.raises(UserError, match=message):
    vocab.sample_sentences(path)
  assert vocab.sample_sentences(path, skip_bad_records=True) == ['fine']


def test_gzip_cut_short_is_a_user_error(tmp_path):
  whole = gzip.compress(b''.join(b'{"text": "line %d"}\n' % i for i in range(5000)))
  path = tmp_path / 'cut.jsonl.gz'
  path.write_bytes(whole[:len(whole) // 2])
  with pytest.raises(UserError, match='cut.jsonl.gz:.*cut short'):
    vocab.sample_sentences(str(path))
  assert vocab.sample_sentences(str(path), skip_bad_records=True)  # what was read before the cut


def test_globs_matching_nothing_and_files_without_text_are_user_errors(tmp_path):
  with pytest.raises(UserError, match=r"--input: '.*/nothing\*\.txt' matches no file"):
    vocab.sample_sentences(f'{tmp_path}/nothing*.txt')
  _write(tmp_path / 'empty.txt', b'\n  \n')
  with pytest.raises(UserError, match='hold no text'):
    vocab.sample_sentences(f'{tmp_path}/empty.txt')
  _write(tmp_path / 'pairs.tsv', b'a\tb\n')
  with pytest.raises(UserError, match='reads text and JSONL files, not tsv'):
    vocab.sample_sentences(f'{tmp_path}/pairs.tsv')


def test_binary_reports_a_bad_glob_in_one_line(tmp_path):
  result = run_binary('t5train.vocab', f'--input={tmp_path}/nothing*.txt', f'--output={tmp_path}/spm')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"t5train.vocab: error: --input: '{tmp_path}/nothing*.txt' matches no file")
  assert 'Traceback' not in result.stderr and not os.path.exists(tmp_path / 'spm')
