"""Command-line flags shared by the binaries, gin parsing with search paths, and exit codes.

Flags are declared here once. ``--gin.NAME=VALUE`` is rewritten to
``--gin_bindings='NAME = VALUE'`` before absl parses the command line (as T5X
does). User mistakes become one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from etils import epath

import gin
from t5train import gin_report, multihost, settings_check, t5x_compat
from t5train.errors import TrainingError, UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An installed wheel holds the gin files in the package (t5train/configs); a checkout in gin/.
_PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
if os.path.isdir(_PACKAGE_CONFIGS):
  DEFAULT_SEARCH_PATHS = (_PACKAGE_CONFIGS,)
else:
  DEFAULT_SEARCH_PATHS = (REPO_ROOT, os.path.join(REPO_ROOT, 'gin'))

# Gin files (and their includes) may live wherever etils.epath reaches, e.g. gs://bucket/run.
gin.config.register_file_reader(lambda path: epath.Path(path).open(),
                                lambda path: epath.Path(path).exists())

_GIN_FILES = flags.DEFINE_multi_string(
    'gin_file', [], 'A gin file to parse; repeatable. Relative paths are looked up in '
    '--gin_search_paths, the current directory and t5train\'s own gin files (gin/ in a '
    'checkout, t5train/configs when installed; a leading gin/ is optional).')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], 'A gin binding such as "MODEL_DIR = \'/tmp/run\'"; repeatable. '
    '--gin.MODEL_DIR="\'/tmp/run\'" is the short form.')
_GIN_SEARCH_PATHS = flags.DEFINE_list(
    'gin_search_paths', [], 'Comma-separated directories in which to look for gin files.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show tracebacks for user errors too.')

# Multi-host: one process per host (names as in T5X and jax.distributed).
_MULTIPROCESS = flags.DEFINE_bool(
    'multiprocess', False, 'Start jax.distributed before anything else. Without the three flags '
    'below, JAX detects the cluster itself (TPU VM, SLURM, Open MPI).')
_MULTIPROCESS_GPU = flags.DEFINE_bool(
    'multiprocess_gpu', False, 'T5X\'s name of --multiprocess (on any platform here).')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, e.g. 10.0.0.2:1234 (with --multiprocess).')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', None, 'Number of processes (hosts).')
_PROCESS_INDEX = flags.DEFINE_integer('process_index', None, 'This process\'s index, from 0.')
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', None, 'With --multiprocess: seconds to wait for every process to '
    'join jax.distributed (JAX\'s default, 300, when unset).', lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', multihost.HEARTBEAT_TIMEOUT_SECONDS,
    'With --multiprocess: a process that sends no heartbeat for this long counts as dead, and '
    'the others exit with an error instead of waiting for it.', lower_bound=1)

# Data locations, as in T5X.
_TFDS_DATA_DIR = flags.DEFINE_string(
    'tfds_data_dir', None, 'Directory of the TensorFlow Datasets data that tasks read; overrides '
    'the tfds_data_dir of every seqio Task (seqio.set_tfds_data_dir_override).')
_SEQIO_ADDITIONAL_CACHE_DIRS = flags.DEFINE_list(
    'seqio_additional_cache_dirs', [], 'Comma-separated directories in which to look for '
    'cached seqio Tasks too (seqio.add_global_cache_dirs).')

# t5train.infer: this job's share of the examples (T5X's infer flag; gin's infer.shard_id too).
_SHARD_ID = flags.DEFINE_integer(
    'shard_id', None, 't5train.infer only: infer shard SHARD_ID of --num_shards (or of '
    'infer.num_shards) and write <task>-<mode>.jsonl-0000SHARD_ID-of-0000N. Overrides '
    'infer.shard_id.', lower_bound=0)
_NUM_SHARDS = flags.DEFINE_integer(
    'num_shards', None, 't5train.infer only: the number of shards the examples are split into. '
    'Overrides infer.num_shards.', lower_bound=1)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """``--gin.X=V`` -> ``--gin_bindings=X = V`` (absl does not allow dots in flag names)."""
  rewritten = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise app.UsageError(f'{arg}: expected --gin.NAME=VALUE')
      arg = f'--gin_bindings={name} = {value}'
    rewritten.append(arg)
  return rewritten


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parser, after rewriting ``--gin.X=V`` arguments."""
  return flags.FLAGS(rewrite_gin_args(argv))


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return ' '.join(lines[:3]) if lines else type(error).__name__


class _GinSearchFilter(std_logging.Filter):
  """Hides gin's "Path not found" lines, logged for every search path tried before a hit."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Path not found')


def _without_checkout_prefix(path: str) -> str:
  """``gin/models/x.gin`` -> ``models/x.gin`` where only the latter exists (installed wheel).

  Commands written for a checkout name gin files under ``gin/``; the wheel ships that folder's
  contents as the package's search path, so the same commands work from any directory.
  """
  if not path.startswith('gin/') or os.path.exists(path):
    return path
  return path[len('gin/'):] if any(os.path.exists(os.path.join(d, path[len('gin/'):]))
                                   for d in DEFAULT_SEARCH_PATHS) else path


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files then bindings; unknown names and missing files raise UserError."""
  t5x_compat.install_t5x_names()  # ``from t5x import ...``, unless the real t5x is installed
  for path in [*search_paths, os.getcwd(), *DEFAULT_SEARCH_PATHS, *t5x_compat.gin_search_paths()]:
    gin.add_config_file_search_path(path)
  quiet_search = _GinSearchFilter()
  std_logging.getLogger().addFilter(quiet_search)
  try:
    with gin_report.recording_sources():  # which file or flag set each binding
      gin.parse_config_files_and_bindings([_without_checkout_prefix(f) for f in gin_files],
                                          list(gin_bindings),
                                          finalize_config=False)
    gin.finalize()  # reports macros left at %gin.REQUIRED
  except OSError as e:
    raise UserError(f'cannot read gin file: {_first_line(e)}. Looked in the current directory, '
                    f'--gin_search_paths and {", ".join(DEFAULT_SEARCH_PATHS)}') from e
  except (ValueError, SyntaxError, ImportError, AttributeError, KeyError, NameError) as e:
    message = _first_line(e)
    if 'set to `%gin.REQUIRED`' in message:
      name = message.split('/')[0]
      raise UserError(f'required macro {name} is not set: add --gin.{name}=... or bind it in a '
                      'gin file') from e
    raise UserError(f'bad gin configuration: {message}') from e
  finally:
    std_logging.getLogger().removeFilter(quiet_search)
  settings_check.check_bound_settings()


def parse_gin_from_flags() -> None:
  parse_gin(_GIN_FILES.value, _GIN_BINDINGS.value, _GIN_SEARCH_PATHS.value)


def _bound(selector: str) -> tuple[bool, Any]:
  try:
    return True, gin.query_parameter(selector)
  except ValueError:
    return False, None


class GinCallGuard:
  """Tells gin's errors (raised before a configurable's body runs) from the body's own.

  Gin checks required bindings and builds ``@references`` before calling the
  function, so an exception raised before ``enter()`` is a configuration error.
  """

  def __init__(self) -> None:
    self.entered = False
    self.on_enter: Callable[[], object] | None = None  # the binary's unused-binding check

  def enter(self) -> None:
    self.entered = True
    hook, self.on_enter = self.on_enter, None
    if hook is not None:
      hook()


def call_configured(fn: Callable[[], object], guard: GinCallGuard) -> object:
  try:
    return fn()
  except (UserError, TrainingError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    if guard.entered:
      raise
    raise UserError(f'bad gin configuration: {_first_line(e)}') from e


class _LibraryChatterFilter(std_logging.Filter):
  """Drops the INFO lines of Orbax, seqio and gin's file search, which drown the progress lines."""

  _QUIET = ('/orbax/', '/seqio/', '/gin/resource_reader', '/jax/_src/xla_bridge',
            '/tensorflow/python/checkpoint/')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if str(record.msg).startswith('Metadata file does not exist'):  # harmless, on every restore
      return False
    if any(part in record.pathname for part in self._QUIET):
      return record.levelno >= std_logging.WARNING and 'resource_reader' not in record.pathname
    return True


def initialize_multiprocess_from_flags() -> None:
  """Joins the process group when ``--multiprocess`` (or T5X's ``--multiprocess_gpu``) is given;
  other hosts log warnings only."""
  given = [_COORDINATOR_ADDRESS.value, _PROCESS_COUNT.value, _PROCESS_INDEX.value,
           _INITIALIZATION_TIMEOUT.value]
  if not (_MULTIPROCESS.value or _MULTIPROCESS_GPU.value):
    if any(value is not None for value in given):
      raise UserError('--coordinator_address, --process_count, --process_index and '
                      '--initialization_timeout need --multiprocess (or --multiprocess_gpu)')
    return
  multihost.initialize(_COORDINATOR_ADDRESS.value, _PROCESS_COUNT.value, _PROCESS_INDEX.value,
                       heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
                       initialization_timeout=_INITIALIZATION_TIMEOUT.value)
  if not multihost.is_primary():
    logging.set_verbosity(logging.WARNING)


def apply_data_flags() -> None:
  """``--tfds_data_dir`` and ``--seqio_additional_cache_dirs``, as T5X applies them (seqio is
  imported only when one is given: it brings TensorFlow)."""
  if not (_TFDS_DATA_DIR.value or _SEQIO_ADDITIONAL_CACHE_DIRS.value):
    return
  import seqio  # pylint: disable=g-import-not-at-top
  if _TFDS_DATA_DIR.value:
    seqio.set_tfds_data_dir_override(_TFDS_DATA_DIR.value)
    logging.info('TFDS data dir: %s (--tfds_data_dir).', _TFDS_DATA_DIR.value)
  if _SEQIO_ADDITIONAL_CACHE_DIRS.value:
    seqio.add_global_cache_dirs(_SEQIO_ADDITIONAL_CACHE_DIRS.value)
    logging.info('seqio cache dirs: %s.', ', '.join(seqio.get_global_cache_dirs()))


def shard_arguments(program: str) -> dict[str, int]:
  """``--shard_id`` / ``--num_shards`` as arguments of ``infer`` (they override its gin
  bindings, as T5X's ``--shard_id`` does); a UserError for the other binaries."""
  given = {name: flag.value for name, flag in (('shard_id', _SHARD_ID),
                                                ('num_shards', _NUM_SHARDS))
           if flag.value is not None}
  if given and program != 't5train.infer':
    raise UserError(f'--{" and --".join(given)} {"is a flag" if len(given) == 1 else "are flags"}'
                    f' of t5train.infer, not of {program}')
  return given


def resolve_random_seed(random_seed: int | None, function: Callable[..., Any] | str) -> int:
  """The run's seed: ``random_seed``, or for None (T5X's ``RANDOM_SEED = None``) a fresh one,
  the same on every process, logged and written into gin's config (``RANDOM_SEED = <seed>`` in
  config.gin) so that the run can be repeated. ``function`` is the binary's configurable
  function (or its gin selector) whose ``random_seed`` gin binds."""
  if random_seed is not None:
    return random_seed
  if isinstance(function, str):
    selector = function
  else:
    registered = gin.config._inverse_lookup(function)  # pylint: disable=protected-access
    selector = registered.selector if registered is not None else function.__name__
  seed = multihost.draw_seed()
  macro = None
  try:
    bound = gin.query_parameter(f'{selector}.random_seed')
  except ValueError:
    bound = None
  if isinstance(bound, gin.config.ConfigurableReference) and \
      bound.selector == 'gin.macro' and bound.scoped_selector.count('/') == 1:
    macro = bound.scoped_selector.split('/')[0]
  with gin.unlock_config():
    if macro is not None:
      gin.bind_parameter(f'{macro}/gin.macro.value', seed)
      # Evaluating the macro records its new value in the operative config (config.gin).
      gin.config.parse_value(f'%{macro}').scoped_configurable_fn()
    elif bound is not None or _bound(f'{selector}.random_seed')[0]:
      _record_seed_binding(selector, seed)
  name = macro or f'{selector.split(".")[-1]}.random_seed'
  logging.info('%s is None: drew the random seed %d (--gin.%s=%d repeats this run; config.gin '
               'records it).', name, seed, name, seed)
  return seed


def _record_seed_binding(selector: str, seed: int) -> None:
  """``<function>.random_seed = None`` bound directly: the drawn seed in its place, in the
  bindings and in the operative config already recorded for the call."""
  gin.bind_parameter(f'{selector}.random_seed', seed)
  with gin.config._OPERATIVE_CONFIG_LOCK:  # pylint: disable=protected-access
    for (_, recorded), values in gin.config._OPERATIVE_CONFIG.items():  # pylint: disable=protected-access
      same = recorded == selector or recorded.endswith(f'.{selector}') or \
          selector.endswith(f'.{recorded}')
      if same and values.get('random_seed', 0) is None:
        values['random_seed'] = seed


def configured_binary(configured: Callable[..., Any], guard: GinCallGuard, program: str,
                      on_start: Callable[[], None] | None = None) -> Callable[[], None]:
  """The console entry point of a gin binary: parse the flags and gin files, then call
  ``configured`` with the arguments gin binds to it (train, infer and evaluate).
  ``on_start`` runs first (the train binary catches stop signals from then on)."""
  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
    t5x_compat.prepare_binary(configured.__module__)  # ``import __main__ as train_script``
    parse_gin_from_flags()
    # Bindings that configure nothing: checked once gin has built the arguments, and at the end.
    report = gin_report.Report(program)
    guard.on_enter = report.at_start
    try:
      arguments = shard_arguments(program)
      call_configured(lambda: gin.get_configurable(configured)(**arguments), guard)
    finally:
      guard.on_enter = None
    report.at_end()

  def console_main() -> None:
    if on_start is not None:
      on_start()
    flags.adopt_module_key_flags(sys.modules[__name__])  # list the gin flags in --help
    run(main, program)

  return console_main


def run(main: Callable[[Sequence[str]], None], program: str) -> None:
  """``app.run`` with T5X-style gin flags; a UserError (status 2) or TrainingError (status 1)
  is printed as one line."""
  def main_with_exit_codes(argv: Sequence[str]) -> None:
    logging.get_absl_handler().addFilter(_LibraryChatterFilter())
    try:
      initialize_multiprocess_from_flags()
      apply_data_flags()
      main(argv)
    except (UserError, TrainingError) as e:
      if _DEBUG.value:
        traceback.print_exc()
      # Gin appends "In call to configurable ..." lines to errors raised inside configurables.
      message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      print(f'{program}: error: {message}', file=sys.stderr)
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      # Exit without interpreter teardown: Orbax's and TensorFlow's background threads would
      # print shutdown noise after the message. Nothing is left to write at this point.
      os._exit(2 if isinstance(e, UserError) else 1)

  app.run(main_with_exit_codes, flags_parser=parse_flags)
