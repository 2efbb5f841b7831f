"""The benchmark's model dimensions, read from the model gin files of the checkout.

Only literal ``network.T5Config`` bindings are read, with gin's own parser and
without running the files' imports, so the benchmark's parent process needs
neither seqio nor TensorFlow. Macros and references (``%DROPOUT_RATE``) are
left to the benchmark, which sets dropout and dtype itself.
"""

from __future__ import annotations

import io
import os
from typing import Any

from gin import config_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, 'gin')
T5_CONFIG = 'network.T5Config'


class _Unevaluated(config_parser.ParserDelegate):
  """Keeps references and macros as markers instead of resolving them (no imports run)."""

  def configurable_reference(self, scoped_name: str, evaluate: bool) -> Any:
    return _Marker(scoped_name)

  def macro(self, name: str) -> Any:
    return _Marker(name)


class _Marker(str):
  """A reference or macro in a gin file, whose value the benchmark does not need."""


def t5_config_bindings(gin_file: str) -> dict[str, Any]:
  """The literal ``network.T5Config`` bindings of ``gin_file`` (relative to gin/), its includes
  first, so that the including file's bindings win as in gin."""
  with open(os.path.join(GIN_DIR, gin_file)) as f:
    statements = list(config_parser.ConfigParser(io.StringIO(f.read()), _Unevaluated()))
  bindings: dict[str, Any] = {}
  for statement in statements:
    if isinstance(statement, config_parser.IncludeStatement):
      bindings.update(t5_config_bindings(statement.filename))
    elif (isinstance(statement, config_parser.BindingStatement) and
          statement.selector == T5_CONFIG and not statement.scope and
          not isinstance(statement.value, _Marker)):
      bindings[statement.arg_name] = statement.value
  return bindings


def model_size(family: str, name: str) -> dict[str, Any]:
  """``network.T5Config`` fields of ``gin/models/<family>/<name>.gin``, without its dtype, which
  the benchmark chooses."""
  bindings = t5_config_bindings(os.path.join('models', family, f'{name}.gin'))
  bindings.pop('dtype', None)
  if isinstance(bindings.get('mlp_activations'), list):
    bindings['mlp_activations'] = tuple(bindings['mlp_activations'])
  return bindings


def t5_1_1_size(name: str) -> dict[str, Any]:
  """``network.T5Config`` fields of T5 1.1 ``name`` (gin/models/t5_1_1/<name>.gin)."""
  return model_size('t5_1_1', name)


def known_sizes(family: str = 't5_1_1') -> list[str]:
  """The sizes of ``family`` that have a gin file."""
  directory = os.path.join(GIN_DIR, 'models', family)
  return sorted(name[:-4] for name in os.listdir(directory)
                if name.endswith('.gin') and name != 'base_architecture.gin')
