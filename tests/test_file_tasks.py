"""Tasks over users' files: formats, columns, per-host shares, exact resume and bad input."""

import gzip
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5train import data, file_tasks
from t5train.errors import UserError

BYTES = seqio.ByteVocabulary()
LENGTHS = {'inputs': 16, 'targets': 16}
PAIRS = [(f'{i} plus one', f'{i + 1}') for i in range(40)]


def _pairs(name, **kwargs):
  return file_tasks.pairs_task(name=name, vocabulary=BYTES, **kwargs)


def _texts(task, split='train', num_examples=None):
  config = data.DatasetConfig(task, LENGTHS, split=split)
  return [(ex['inputs_pretokenized'].decode(), ex['targets_pretokenized'].decode())
          for ex in data.pretokenized_examples(config, num_examples)]


def _write(path, lines, opener=open):
  with opener(path, 'wt', encoding='utf-8') as f:
    f.writelines(line + '\n' for line in lines)
  return str(path)


@pytest.fixture(scope='module')
def pair_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('pairs')
  return {
      'tsv': _write(root / 'a.tsv', [f'{i}\t{t}' for i, t in PAIRS]),
      'csv': _write(root / 'b.csv', ['id,question,answer'] +
                    [f'{n},"{i}, really","{t}"' for n, (i, t) in enumerate(PAIRS)]),
      'jsonl': _write(root / 'c.jsonl.gz', [json.dumps({'q': i, 'a': t, 'n': 1}) for i, t in PAIRS],
                      opener=gzip.open),
  }


def test_pairs_come_from_tsv_csv_and_gzipped_jsonl(pair_files):
  assert _texts(_pairs('t_tsv', train_files=pair_files['tsv'])) == PAIRS
  # A header row names the columns; quoted CSV fields keep their commas.
  csv_task = _pairs('t_csv', train_files=pair_files['csv'], input_field='question',
                    target_field='answer')
  assert _texts(csv_task) == [(f'{i}, really', t) for i, t in PAIRS]
  jsonl_task = _pairs('t_jsonl', train_files=[pair_files['jsonl']], input_field='q',
                      target_field='a')
  assert _texts(jsonl_task) == PAIRS
  # Validation files make the validation split; without them there is none.
  both = _pairs('t_both', train_files=pair_files['tsv'], validation_files=pair_files['tsv'])
  assert seqio.get_mixture_or_task(both).splits == ('train', 'validation')
  with pytest.raises(UserError, match="no split 'validation'.*VALIDATION_FILES"):
    data.check_split(data.DatasetConfig('t_tsv', LENGTHS, split='validation'))


def _host_share(task, shard_id, num_shards):
  config = data.DatasetConfig(task, LENGTHS, batch_size=2, shuffle=False)
  dataset = data.get_dataset(config, seqio.EncDecFeatureConverter, num_epochs=1,
                             shard_id=shard_id, num_shards=num_shards)
  return [tuple(row) for batch in dataset.as_numpy_iterator()
          for row in batch['encoder_input_tokens']]


@pytest.mark.parametrize('num_files', [3, 1])
def test_hosts_read_disjoint_shares(tmp_path, num_files):
  # Three files over two hosts: whole files each; one file: alternate lines.
  files = [_write(tmp_path / f'{n}.tsv', [f'{n} {i}\t{t}' for i, t in PAIRS[:10]])
           for n in range(num_files)]
  task = _pairs(f'shares{num_files}', train_files=files)
  shares = [_host_share(task, shard, 2) for shard in (0, 1)]
  everything = _host_share(task, 0, 1)
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(everything)
  assert len(everything) == 10 * num_files


def test_a_checkpointed_reader_resumes_exactly(pair_files, tmp_path):
  task = _pairs('resume', train_files=pair_files['tsv'])
  config = data.DatasetConfig(task, LENGTHS, batch_size=4, seed=3)
  dataset = data.get_dataset(config, seqio.EncDecFeatureConverter)
  iterator = iter(dataset)
  for _ in range(13):  # into the second epoch, mid shuffle buffer
    next(iterator)
  tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / 'position'))
  expected = [next(iterator)['encoder_input_tokens'].numpy() for _ in range(6)]
  restored = iter(dataset)
  tf.train.Checkpoint(iterator=restored).read(str(tmp_path / 'position')).assert_consumed()
  np.testing.assert_array_equal([next(restored)['encoder_input_tokens'].numpy()
                                 for _ in range(6)], expected)


def test_tasks_mix_by_rate(pair_files):
  first = _pairs('mix_a', train_files=pair_files['tsv'])
  second = _pairs('mix_b', train_files=pair_files['jsonl'], input_field='q', target_field='a')
  name = file_tasks.mixture(name='mixed', tasks=[first, second], rates=[1.0, 3.0])
  assert seqio.get_mixture_or_task(name).get_rate(seqio.get_mixture_or_task(second)) == 3.0
  with pytest.raises(UserError, match='2 tasks but 1 rates'):
    file_tasks.mixture(name='bad_mix', tasks=[first, second], rates=[1.0])


BAD_AT_REGISTRATION = [
    ('missing.tsv', None, r"'.*nothing\*\.tsv' matches no file"),
    ('empty.tsv', [], 'the file is empty'),
    ('no_tab.tsv', ['fine\tline', 'no tab here'], r'no_tab.tsv:2: 1 column\(s\), expected 2'),
    ('not_json.jsonl', ['{"inputs": "a", "targets": "b"}', '{"inputs": '],
     r'not_json.jsonl:2: invalid JSON'),
    ('no_field.jsonl', ['{"inputs": "a"}'], r"no_field.jsonl:1: no field 'targets'"),
    ('header.csv', ['question,reply', 'a,b'], r"header.csv:1: the header row .* no column 'answer'"),
]


@pytest.mark.parametrize('name,lines,message', BAD_AT_REGISTRATION)
def test_bad_files_are_reported_when_the_task_is_registered(tmp_path, name, lines, message):
  path = str(tmp_path / ('nothing*.tsv' if lines is None else name))
  if lines is not None:
    _write(path, lines)
  fields = {'input_field': 'question', 'target_field': 'answer'} if name.endswith('.csv') else {}
  with pytest.raises(UserError, match=message):
    _pairs(f'bad_{name}', train_files=path, **fields)


def test_bad_records_later_in_a_file_name_their_line(tmp_path):
  good = [f'{i}\t{t}' for i, t in PAIRS[:30]]
  path = str(tmp_path / 'late.tsv')
  with open(path, 'wb') as f:
    f.write(('\n'.join(good) + '\n').encode())
    f.write(b'caf\xe9\tlatin-1\n')  # line 31: not UTF-8
  task = _pairs('late', train_files=path)
  with pytest.raises(UserError, match=r'late.tsv:31: not UTF-8'):
    _texts(task)
  # With skip_bad_records the line is skipped and counted.
  before = file_tasks.skipped_records().get('train', 0)
  skipping = _pairs('late_skip', train_files=path, skip_bad_records=True)
  assert len(_texts(skipping)) == 30
  assert file_tasks.skipped_records()['train'] == before + 1
  assert data.data_scalars()['data/skipped_records/train'] == before + 1


def test_a_gzip_file_cut_short_is_an_error_not_an_early_end(tmp_path):
  whole = tmp_path / 'whole.tsv.gz'
  # Short inputs first: the cut most likely falls in a target, so that the last line still parses.
  _write(whole, [f'{i}\ttarget text of line {i}, padded with {i * 7919} and more words'
                 for i in range(20000)], opener=gzip.open)
  cut = tmp_path / 'cut.tsv.gz'
  cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  task = _pairs('cut', train_files=str(cut))
  with pytest.raises(UserError, match=r'cut.tsv.gz.*cut short'):
    _texts(task)


def test_tokenizing_in_batches_gives_seqios_ids():
  """SentencePiece encodes a batch of lines at once; the ids, the pretokenized copies and the
  order equal seqio's record-by-record tokenize, over more than one batch and empty lines."""
  vocabulary = seqio.SentencePieceVocabulary(os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'))
  features = {'inputs': seqio.Feature(vocabulary), 'targets': seqio.Feature(vocabulary)}
  lines = [f'line {i}: ' + 'word ' * (i % 7) for i in range(600)] + ['']
  dataset = tf.data.Dataset.from_tensor_slices({'inputs': lines, 'targets': lines[::-1]})
  batched = list(file_tasks.tokenize_in_batches(dataset, features).as_numpy_iterator())
  one_by_one = list(seqio.preprocessors.tokenize(dataset, features).as_numpy_iterator())
  assert len(batched) == len(one_by_one) == 601
  for got, want in zip(batched, one_by_one):
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
