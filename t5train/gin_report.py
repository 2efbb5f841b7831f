"""Gin bindings that configure nothing the run uses: named in a warning, or an error when strict.

Gin applies a binding only when the configurable it names is called in a scope that the binding's
scope is a prefix of. A binding of a registration that nothing calls (``train_script.train`` in a
file whose binary runs another function), in a scope that no call has
(``data.DatasetConfig.batch_size`` where only ``train/`` and ``train_eval/`` datasets are built),
or of a parameter that every caller passes itself, changes nothing, and gin says nothing. Gin
records every call in its operative config (``_OPERATIVE_CONFIG``, keyed by call scope and
selector, with the parameters the call took from gin); comparing that with what was bound
(``_CONFIG``) finds those bindings.

Who wrote a binding decides how it is reported, so ``parse_gin`` records the source of each one
while gin parses (``recording_sources``):

* the command line and the user's own gin files: a warning per binding, naming it, where it came
  from and why it configures nothing; with the macro ``STRICT_BINDINGS = True`` the binary exits
  with status 2 instead, listing them in one line;
* a run's operative config (``MODEL_DIR/config.gin``, as t5train and T5X write it, given to
  infer or eval): one info line with the number of its unused bindings (the training settings
  that infer and eval do not read);
* t5train's own gin files (``gin/``, the installed package's configs) and T5X's (``t5x/configs``,
  ``t5x/examples``): one info line, as their optional settings (the best-checkpoint config, the
  inference-evaluation dataset) are unused in many runs.

The binaries check twice (see ``gin_utils.configured_binary``): when the configured function
starts, after gin has built every argument and before anything is compiled, and when it returns.
The first check leaves out what may still be called: the configurables that a used binding
passes uncalled (``decode_fn = @decoding.beam_search``), and what their bindings refer to. The
second reports those that stayed unused.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from absl import logging

import gin
from t5train.errors import UserError

STRICT_MACRO = 'STRICT_BINDINGS'

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Gin files shipped with t5train: the package (its configs, compatibility files) and a checkout's gin/.
FRAMEWORK_DIRS = [_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), 'gin')]
# T5X's own gin files, which t5train runs in place of T5X (or finds in a T5X checkout).
_T5X_FRAMEWORK = re.compile(r'(^|/)t5x/(configs|examples|contrib)/')
# gin.operative_config_str() writes these headers (t5train's and T5X's MODEL_DIR/config.gin).
_OPERATIVE_HEADER = re.compile(r'^# (Macros|Parameters for \S+):\s*\n# =+\s*$', re.M)

COMMAND_LINE = 'command line'
USER_FILE = 'file'
OPERATIVE_CONFIG = 'operative config'
FRAMEWORK_FILE = 'framework file'
CODE = 'code'  # bound by a program (a finalize hook, bind_parameter), not parsed from gin

Key = tuple[str, str, str]  # (scope, complete selector, parameter); macros: (NAME, 'gin.macro', 'value')


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str
  name: str = ''  # the file as it was named (--gin_file or include)

  def describe(self) -> str:
    return self.name if self.kind != COMMAND_LINE and self.name else self.kind


@dataclasses.dataclass(frozen=True)
class _Recorded:
  source: Source
  given_selector: str  # as the binding spelt it (``data.DatasetConfig``, ``train_script.train``)


_recorded: dict[Key, _Recorded] | None = None  # None: no parse was recorded (all count as the user's)


def _resolve(config_file: str) -> tuple[str, Any] | tuple[None, None]:
  """The path gin opens for ``config_file`` and the reader it uses (the same search as gin)."""
  config = gin.config
  prefixes = config._LOCATION_PREFIXES if not os.path.isabs(config_file) else ['']
  for prefix in prefixes:
    path = os.path.join(prefix, config_file)
    for reader, exists in config._FILE_READERS:
      if exists(path):
        return path, reader
  return None, None


def is_framework_file(given: str, path: str) -> bool:
  """Whether a gin file is t5train's own (or T5X's), whose optional bindings need no warning."""
  if _T5X_FRAMEWORK.search(given.replace(os.sep, '/')) or _T5X_FRAMEWORK.search(
      path.replace(os.sep, '/')):
    return True
  real = os.path.realpath(path) if '://' not in path else path
  return any(real == d or real.startswith(os.path.join(os.path.realpath(d), '')) for d in FRAMEWORK_DIRS)


def is_operative_config(text: str) -> bool:
  """Whether gin text was written by ``gin.operative_config_str()`` (a run's config.gin)."""
  return bool(_OPERATIVE_HEADER.search(text))


def _file_source(config_file: str) -> Source:
  try:
    path, reader = _resolve(config_file)
    if path is None:
      return Source(USER_FILE, config_file)
    if is_framework_file(config_file, path):
      return Source(FRAMEWORK_FILE, config_file)
    with reader(path) as f:
      text = f.read()
    text = text.decode('utf-8', 'replace') if isinstance(text, bytes) else text
    return Source(OPERATIVE_CONFIG if is_operative_config(text) else USER_FILE, config_file)
  except Exception:  # pylint: disable=broad-except  (gin reports unreadable files itself)
    return Source(USER_FILE, config_file)


@contextlib.contextmanager
def recording_sources() -> Iterator[None]:
  """Records which file (or the command line) set each binding gin parses in this block.

  Gin keeps no such record, so its ``parse_config_file`` (files and includes),
  ``parse_config`` (a file's text, or the command-line bindings) and ``bind_parameter`` are
  wrapped for the duration; the last binding of a key decides its source, as it decides its value.
  """
  global _recorded
  config = gin.config
  originals = config.parse_config_file, config.parse_config, config.bind_parameter
  files: list[Source] = []
  depth = [0]
  recorded: dict[Key, _Recorded] = {}

  def parse_config_file(config_file, *args, **kwargs):
    files.append(_file_source(config_file))
    try:
      return originals[0](config_file, *args, **kwargs)
    finally:
      files.pop()

  def parse_config(*args, **kwargs):
    depth[0] += 1
    try:
      return originals[1](*args, **kwargs)
    finally:
      depth[0] -= 1

  def bind_parameter(binding_key, value):
    originals[2](binding_key, value)
    try:
      key = config.ParsedBindingKey.parse(binding_key)
    except Exception:  # pylint: disable=broad-except
      return
    source = files[-1] if files else Source(COMMAND_LINE if depth[0] else CODE)
    recorded[key.scope_selector_arg] = _Recorded(source, key.given_selector)

  config.parse_config_file, config.parse_config, config.bind_parameter = (
      parse_config_file, parse_config, bind_parameter)
  try:
    yield
  finally:
    config.parse_config_file, config.parse_config, config.bind_parameter = originals
    _recorded = recorded


def forget_sources() -> None:
  """Drops the recorded sources (every binding then counts as the user's)."""
  global _recorded
  _recorded = None


@dataclasses.dataclass(frozen=True)
class Unused:
  """A binding that configured nothing: its key, where it came from, why, and whether a
  configurable that is passed around uncalled may still use it."""

  key: Key
  source: Source
  name: str  # as the user would write it: ``train/data.DatasetConfig.pack``, ``MODEL_DIR``
  reason: str
  pending: bool

  @property
  def configurable(self) -> str:
    return self.name if self.key[1] == 'gin.macro' else self.name.rsplit('.', 1)[0]

  def describe(self) -> str:
    return f'{self.name} ({self.source.describe()}: {self.reason})'


def _components(scope: str) -> tuple[str, ...]:
  return tuple(scope.split('/')) if scope else ()


def _is_macro(selector: str) -> bool:
  return selector == 'gin.macro'


def _display_selector(selector: str, given: str | None) -> str:
  if given:
    return given
  try:
    return gin.config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return selector


def _name(key: Key, given: str | None) -> str:
  scope, selector, arg = key
  if _is_macro(selector):
    return scope
  return f'{scope + "/" if scope else ""}{_display_selector(selector, given)}.{arg}'


def _references(value: Any) -> Iterator[Any]:
  return gin.config.iterate_references(value)


def _pending_targets(config: dict, operative: dict) -> tuple[set[str], set[tuple[str, str]]]:
  """Selectors (and macro keys) that may still be called: passed uncalled by a used binding
  (``@decoding.beam_search``), and what their bindings refer to."""
  selectors: set[str] = set()
  macros: set[tuple[str, str]] = set()
  frontier = [ref for ref in _references(operative) if not ref.evaluate]
  while frontier:
    ref = frontier.pop()
    key = ref.config_key
    if _is_macro(key[1]):
      if key in macros:
        continue
      macros.add(key)
      frontier.extend(_references(config.get(key, {})))
      continue
    if key[1] in selectors:
      continue
    selectors.add(key[1])
    for (_, selector), params in config.items():
      if selector == key[1]:
        frontier.extend(_references(params))
  return selectors, macros


def unused_bindings(ignore: Iterable[Key] = ()) -> list[Unused]:
  """Every binding of the parsed config that no call so far has taken, in gin's order."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  operative = gin.config._OPERATIVE_CONFIG  # pylint: disable=protected-access
  ignored = {(STRICT_MACRO, 'gin.macro', 'value'), *ignore}
  calls: dict[str, list[tuple[tuple[str, ...], frozenset[str]]]] = collections.defaultdict(list)
  with gin.config._OPERATIVE_CONFIG_LOCK:  # pylint: disable=protected-access
    operative = {key: dict(params) for key, params in operative.items()}
  for (scope, selector), params in operative.items():
    calls[selector].append((_components(scope), frozenset(params)))
  pending_selectors, pending_macros = _pending_targets(config, operative)
  recorded = _recorded

  def bound_in(scope: tuple[str, ...], selector: str, arg: str) -> bool:
    return arg in config.get(('/'.join(scope), selector), {})

  found = []
  for (scope, selector), params in list(config.items()):
    bound_scope = _components(scope)
    for arg in params:
      key = (scope, selector, arg)
      if key in ignored:
        continue
      under = [(s, p) for s, p in calls.get(selector, ()) if s[:len(bound_scope)] == bound_scope]
      # The binding a call reads is the one of its longest bound scope prefix.
      read = [(s, p) for s, p in under
              if not any(bound_in(s[:i], selector, arg) for i in range(len(bound_scope) + 1,
                                                                       len(s) + 1))]
      if any(arg in p for _, p in read):
        continue
      entry = recorded.get(key) if recorded is not None else None
      source = entry.source if entry else Source(COMMAND_LINE if recorded is None else CODE)
      given = entry.given_selector if entry else None
      display = _display_selector(selector, given)
      if _is_macro(selector):
        reason = f'no binding that the run uses refers to %{scope}'
        pending = (scope, selector) in pending_macros
      elif selector not in calls:
        reason = f'nothing in the run calls {display}'
        pending = selector in pending_selectors
      elif not under:
        scopes = sorted({'/'.join(s) + '/' if s else '' for s, _ in calls[selector]})
        reason = (f'{display} is called only as '
                  f'{", ".join(s + display for s in scopes)}')
        pending = selector in pending_selectors
      elif not read:
        specific = sorted({f'{"/".join(s[:i])}/{display}.{arg}' for s, _ in under
                           for i in range(len(bound_scope) + 1, len(s) + 1)
                           if bound_in(s[:i], selector, arg)})
        reason = f'every call reads a more specific binding ({", ".join(specific)})'
        pending = selector in pending_selectors
      else:
        reason = f'the code passes {arg} itself'
        pending = selector in pending_selectors
      found.append(Unused(key, source, _name(key, given), reason, pending))
  return found


def strict() -> bool:
  """The macro ``STRICT_BINDINGS`` (default False): whether unused bindings stop the run."""
  value = gin.config._CONFIG.get((STRICT_MACRO, 'gin.macro'), {}).get('value', False)
  if not isinstance(value, bool):
    raise UserError(f'{STRICT_MACRO} must be True or False, not {value!r}')
  return value


def _summary(items: list[Unused], limit: int = 8) -> str:
  items = sorted(items, key=lambda u: _is_macro(u.key[1]))  # configurables, then macros
  names = list(dict.fromkeys(u.configurable for u in items))
  shown = ', '.join(names[:limit])
  return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


class Report:
  """The unused-binding checks of one run of ``program`` (see the module docstring)."""

  def __init__(self, program: str):
    self.program = program
    self._reported: set[Key] = set()
    self._strict = strict()

  def at_start(self) -> list[Unused]:
    """Reports what no call has used once the configured function starts (not what may still
    be called); returns the user's bindings reported."""
    found = self._unused()
    return self._report([u for u in found if not u.pending], final=False)

  def at_end(self) -> list[Unused]:
    """Reports what stayed unused to the end and was not reported at the start."""
    return self._report([u for u in self._unused() if u.key not in self._reported], final=True)

  def _unused(self) -> list[Unused]:
    try:
      return unused_bindings()
    except Exception:  # pylint: disable=broad-except  (a failed check must not stop the run)
      logging.exception('Could not check for gin bindings that configure nothing.')
      return []

  def _report(self, found: list[Unused], final: bool) -> list[Unused]:
    self._reported.update(u.key for u in found)
    does = (f'configured nothing {self.program} used' if final
            else f'configures nothing {self.program} uses')
    by_kind: dict[str, list[Unused]] = collections.defaultdict(list)
    for u in found:
      by_kind[u.source.kind].append(u)
    for name, items in _group_by_file(by_kind[OPERATIVE_CONFIG]).items():
      logging.info('%s is a run\'s operative config; %d of its bindings (%s) %s. They are the '
                   'settings of the run that wrote it, not listed one by one.', name, len(items),
                   _summary(items), does.replace('configures', 'configure'))
    if by_kind[FRAMEWORK_FILE]:
      t5x = any(_T5X_FRAMEWORK.search(u.source.name) for u in by_kind[FRAMEWORK_FILE])
      logging.info('Optional bindings of %s own gin files that %s: %s.',
                   'T5X\'s and t5train\'s' if t5x else 't5train\'s',
                   does.replace('configures', 'configure'),
                   ', '.join(u.name for u in by_kind[FRAMEWORK_FILE]))
    for u in by_kind[CODE]:
      logging.debug('Gin binding %s (bound by the program) %s: %s.', u.name, does, u.reason)
    user = by_kind[COMMAND_LINE] + by_kind[USER_FILE]
    if not user:
      return []
    if self._strict and not final:  # at the end the work is done (or was stopped): warn only
      many = len(user) > 1
      raise UserError(f'{len(user)} gin binding{"s" if many else ""} '
                      f'{does.replace("configures", "configure") if many else does}: '
                      f'{"; ".join(u.describe() for u in user)}. Correct the name or scope, '
                      f'or remove the binding ({STRICT_MACRO} = True stops a run on them)')
    for u in user:
      logging.warning('Gin binding %s (%s) %s: %s.', u.name, u.source.describe(), does, u.reason)
    logging.warning('Check the name and scope of the gin binding%s above. --gin.%s=True stops a '
                    'run on such bindings before it starts.', 's' if len(user) > 1 else '',
                    STRICT_MACRO)
    return user


def _group_by_file(items: list[Unused]) -> dict[str, list[Unused]]:
  groups: dict[str, list[Unused]] = collections.defaultdict(list)
  for u in items:
    groups[u.source.name].append(u)
  return groups
