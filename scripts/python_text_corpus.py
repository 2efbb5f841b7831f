"""Writes an English text corpus from what every Python installation ships, for `make demo-text`.

    python scripts/python_text_corpus.py --output=/tmp/t5train_text/corpus

The documents are the language reference topics of ``pydoc_data`` and the docstrings of the
standard library's modules, classes and functions, read from their source (nothing is
imported or downloaded), one document per line. About one in twenty documents, chosen by a
hash of its text, goes to ``validation.txt``; the rest to ``train.txt``. ``heldout.tsv`` holds
held-out sentences with word spans replaced by T5's sentinels, a tab, and the spans they hide
(the format span-corruption targets have), for the infer binary.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import sysconfig
import zlib

_MIN_WORDS = 8
_VALIDATION_BUCKETS = 20
_SKIPPED_DIRS = {'test', 'tests', 'idlelib', 'site-packages', 'dist-packages', 'lib2to3',
                 'turtledemo', '__pycache__', 'ensurepip', 'tkinter'}


def _one_line(text: str) -> str:
  return ' '.join(text.split())


def _paragraphs(text: str) -> list[str]:
  """Paragraphs of prose: code samples (indented or with >>> prompts) are left out."""
  paragraphs = []
  for block in re.split(r'\n\s*\n', text):
    lines = [line for line in block.splitlines() if line.strip()]
    if not lines or any(line.lstrip().startswith(('>>>', '...', '$')) for line in lines):
      continue
    if all(line.startswith('    ') for line in lines) and len(lines) > 1:
      continue
    paragraph = _one_line(block)
    if len(paragraph.split()) >= _MIN_WORDS:
      paragraphs.append(paragraph)
  return paragraphs


def _docstrings(path: str) -> list[str]:
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return []
  nodes = [tree] + [node for node in ast.walk(tree)
                    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  return [doc for node in nodes if (doc := ast.get_docstring(node))]


def documents() -> list[str]:
  """Every document of the corpus, in a fixed order, each once."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  texts = [topics.topics[name] for name in sorted(topics.topics)]
  stdlib = sysconfig.get_paths()['stdlib']
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith('.'))
    texts.extend(doc for name in sorted(files) if name.endswith('.py')
                 for doc in _docstrings(os.path.join(root, name)))
  return list(dict.fromkeys(p for text in texts for p in _paragraphs(text)))


def is_validation(document: str) -> bool:
  return zlib.crc32(document.encode('utf-8')) % _VALIDATION_BUCKETS == 0


def masked(sentence: str, rng: random.Random, num_spans: int = 2) -> tuple[str, str]:
  """``sentence`` with ``num_spans`` word spans replaced by sentinels, and the target."""
  words = sentence.split()
  starts = sorted(rng.sample(range(1, len(words) - 3, 3), num_spans))
  inputs, targets, position = [], [], 0
  for i, start in enumerate(starts):
    length = rng.randint(1, 2)
    inputs += words[position:start] + [f'<extra_id_{i}>']
    targets += [f'<extra_id_{i}>'] + words[start:start + length]
    position = start + length
  inputs += words[position:]
  return ' '.join(inputs), ' '.join(targets)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output', required=True, help='directory to write the files to')
  parser.add_argument('--heldout_sentences', type=int, default=8)
  args = parser.parse_args()
  os.makedirs(args.output, exist_ok=True)
  docs = documents()
  train = [d for d in docs if not is_validation(d)]
  validation = [d for d in docs if is_validation(d)]
  for name, split in (('train.txt', train), ('validation.txt', validation)):
    with open(os.path.join(args.output, name), 'w', encoding='utf-8') as f:
      f.writelines(d + '\n' for d in split)
  rng = random.Random(0)
  sentences = [s for d in validation for s in re.split(r'(?<=\.) ', d) if 12 <= len(s.split()) <= 25]
  with open(os.path.join(args.output, 'heldout.tsv'), 'w', encoding='utf-8') as f:
    for sentence in rng.sample(sentences, min(args.heldout_sentences, len(sentences))):
      f.write('\t'.join(masked(sentence, rng)) + '\n')
  size = sum(len(d) for d in docs)
  print(f'{len(train)} training and {len(validation)} validation documents ({size / 1e6:.1f} MB) '
        f'in {args.output}')


if __name__ == '__main__':
  main()
