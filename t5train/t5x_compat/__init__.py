"""T5X's module names, backed by t5train, for T5X projects that run unchanged.

A T5X gin file says ``from t5x import utils``, ``from t5x.examples.t5 import network`` and
``import __main__ as train_script``. When the real ``t5x`` package is not installed,
``install_t5x_names()`` makes ``t5x`` and its submodules importable as the modules of this
package (``t5x.utils`` *is* ``t5train.t5x_compat.utils``), whose names build t5train's own
objects from T5X's constructor arguments; arguments that change nothing here are accepted,
those t5train cannot honour raise ``UserError`` with the reason. When ``t5x`` is installed, it
is used as it is and nothing here is installed.

The binaries also add ``configs/`` of this package as the last gin search path, so that
``include 't5x/configs/runs/pretrain.gin'`` and ``'t5x/examples/t5/t5_1_1/base.gin'`` find
t5train's equivalents of T5X's files when no T5X checkout is on the search path; and
``alias_main(module)`` makes ``import __main__ as train_script`` bind the running binary, as
in T5X. docs/migrating_from_t5x.md lists what each name does.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

PACKAGE = __name__  # t5train.t5x_compat
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')

# T5X's modules that this package provides, as ``t5x.<name>`` -> ``t5train.t5x_compat.<name>``.
MODULES = ('adafactor', 'checkpoints', 'decoding', 'gin_utils', 'losses', 'models',
           'optimizers', 'partitioning', 'trainer', 'utils', 'examples', 'examples.t5',
           'examples.t5.network', 'examples.decoder_only', 'examples.decoder_only.network',
           'examples.scalable_t5', 'examples.scalable_t5.network')


class _AliasLoader(importlib.abc.Loader):
  """Loads ``t5x.X`` as the module ``t5train.t5x_compat.X`` itself (one module, two names)."""

  def __init__(self, target: str):
    self._target = target

  def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    return importlib.import_module(self._target)

  def exec_module(self, module: types.ModuleType) -> None:
    del module  # already executed under its own name


class T5XFinder(importlib.abc.MetaPathFinder):
  """Finds ``t5x`` and its submodules among this package's modules."""

  def find_spec(self, fullname, path=None, target=None):  # noqa: D102
    del path, target
    if fullname != 't5x' and not fullname.startswith('t5x.'):
      return None
    rest = fullname[len('t5x.'):] if fullname != 't5x' else ''
    if rest and rest not in MODULES:
      return None  # ImportError: No module named 't5x.<rest>'
    target = f'{PACKAGE}.{rest}' if rest else PACKAGE
    is_package = not rest or rest in ('examples', 'examples.t5', 'examples.decoder_only',
                                      'examples.scalable_t5')
    spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(target), is_package=is_package)
    return spec


def _finder_installed() -> bool:
  return any(isinstance(finder, T5XFinder) for finder in sys.meta_path)


def real_t5x_installed() -> bool:
  """Whether an importable ``t5x`` other than this package's names exists."""
  if _finder_installed():
    return False
  module = sys.modules.get('t5x')
  if module is not None:
    return getattr(module, '__name__', 't5x') != PACKAGE
  spec = importlib.util.find_spec('t5x')
  # A folder named t5x without __init__.py (e.g. a copy of T5X's gin files) is no package.
  return spec is not None and spec.origin not in (None, 'namespace')


def install_t5x_names() -> bool:
  """Makes ``t5x.*`` importable from this package unless the real ``t5x`` is installed.

  Returns whether this package's names are in use. Idempotent.
  """
  if _finder_installed():
    return True
  if real_t5x_installed():
    return False
  sys.meta_path.append(T5XFinder())
  return True


def uninstall_t5x_names() -> None:
  """Undoes ``install_t5x_names`` (for tests): removes the finder and the ``t5x`` modules."""
  sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, T5XFinder)]
  for name in [name for name in sys.modules if name == 't5x' or name.startswith('t5x.')]:
    if getattr(sys.modules[name], '__name__', '').startswith(PACKAGE):
      del sys.modules[name]


def gin_search_paths() -> list[str]:
  """Where ``include 't5x/...'`` is looked up after the user's search paths: the real T5X's
  checkout (the folder above its package, as T5X's binaries add) or this package's equivalents."""
  if _finder_installed():
    return [CONFIGS_DIR]
  spec = importlib.util.find_spec('t5x') if 't5x' not in sys.modules else sys.modules['t5x'].__spec__
  if spec is not None and spec.submodule_search_locations:
    return [os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))]
  return []


def alias_main(module_name: str) -> None:
  """Makes ``import __main__`` (T5X's ``train_script``, ``infer_script``, ``eval_script``)
  give the module ``module_name``, whose function the binary calls.

  ``python -m t5train.train`` runs t5train/train.py as ``__main__`` and calls the function of
  the importable copy ``t5train.train``; a console script's ``__main__`` is the script itself.
  Either way gin must see the function that runs, so ``__main__`` holds that module's names,
  and the other binaries' functions besides.
  """
  module = importlib.import_module(module_name)
  main = types.ModuleType('__main__', module.__doc__)
  main.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith('__')})
  for binary, function in BINARY_FUNCTIONS.items():
    if binary != module_name:
      setattr(main, function, getattr(importlib.import_module(binary), function))
  sys.modules['__main__'] = main


# The function of each binary that T5X's run files bind through ``import __main__``. All three
# are attributes of ``__main__`` in every binary, so that a T5X-style run's config.gin, which
# binds ``train_script.train``, can be given to infer and eval, as t5train's own can.
BINARY_FUNCTIONS = {'t5train.train': 'train', 't5train.infer': 'infer',
                    't5train.eval': 'evaluate'}


def prepare_binary(module_name: str) -> None:
  """What a binary does before parsing gin: T5X's names, and ``__main__`` as ``module_name``."""
  install_t5x_names()
  alias_main(module_name)
