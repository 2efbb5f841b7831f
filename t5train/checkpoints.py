"""The Orbax adapter: periodic saves into ``MODEL_DIR/checkpoint_<step>/``, keep policy, restore.

Orbax writes each checkpoint to a temporary directory and renames it when it
is complete, so an interrupted save is never mistaken for a checkpoint. A bucket
(``gs://``) has no rename: there Orbax writes in place and commits each item with
a ``commit_success.txt`` written last, and only committed checkpoints count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from t5train import hf_interop, network, paths
from t5train.errors import TrainingError, UserError
from t5train.train_state import TrainState, TrainStateInitializer

STEP_PREFIX = 'checkpoint'
AssignmentMap = Sequence[tuple[str, str | None]]
# Each checkpoint directory holds named items; the train state is one of them.
STATE_ITEM = 'state'
# Orbax's mark of a complete save on an object store, where it cannot rename into place.
COMMIT_FILE = 'commit_success.txt'


SAVE_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """When and how to save (T5X's field names).

  A checkpoint is written every ``period`` steps, at each of ``steps``, and at
  the last step. ``keep`` keeps only the newest N (None: all), but a checkpoint
  whose step is a multiple of ``keep_period`` is never deleted. ``dtype`` is the
  dtype of the saved parameters. ``save_dataset`` also saves each host's data
  iterator, for exact resumes. ``use_async`` writes while training goes on.
  """

  period: int | None = 1000
  keep: int | None = None
  keep_period: int | None = None
  steps: tuple[int, ...] = ()
  dtype: str = 'float32'
  save_dataset: bool = True
  use_async: bool = True
  # Functions state_dict -> state_dict applied before ``LegacyCheckpointManager.save``.
  state_transformation_fns: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = ()

  def __post_init__(self) -> None:
    if self.dtype not in SAVE_DTYPES:
      raise UserError(f'SaveCheckpointConfig.dtype must be one of {", ".join(SAVE_DTYPES)}, '
                      f'not {self.dtype!r}')
    for name in ('period', 'keep', 'keep_period'):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise UserError(f'SaveCheckpointConfig.{name} must be a positive number or None, '
                        f'not {value}')


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """What to restore from ``path`` (see ``select_checkpoints`` for the modes).

  ``fallback_to_scratch``: when ``path`` holds no checkpoint, start from scratch
  (with a warning) instead of failing. ``assignment_map``: (regex, replacement)
  pairs that rename a model parameter to the checkpoint's name for it, or with
  None leave it freshly initialised (see ``restore_from_path``). Parameters are
  always restored in the model's dtype; ``dtype`` is accepted for T5X compatibility.
  """

  path: str | None = None
  mode: str = 'latest'
  dtype: str = 'float32'
  fallback_to_scratch: bool = False
  assignment_map: tuple[tuple[str, str | None], ...] = ()


def checkpoint_dir(model_dir: str, step: int) -> str:
  return paths.join(model_dir, f'{STEP_PREFIX}_{step}')


def _abstract(state_shape: TrainState, state_shardings: TrainState) -> TrainState:
  return jax.tree_util.tree_map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      state_shape, state_shardings)


def saved_tree(item_dir: str) -> dict[str, Any]:
  """The saved tree's metadata (shapes and dtypes), without reading any array."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(item_dir)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f'{os.path.dirname(item_dir)} is not a t5train checkpoint ({e})') from e
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  if not isinstance(tree, Mapping):
    raise UserError(f'{os.path.dirname(item_dir)} is damaged: its metadata cannot be read. '
                    'Earlier checkpoints are not affected; delete this one to resume from them')
  return dict(tree)


def check_shapes(expected: Mapping[str, Any], saved: Mapping[str, Any], where: str) -> None:
  """UserError naming the first parameter whose shape differs, is missing, or is extra.

  Both arguments map parameter paths ('encoder/layers_0/...') to anything with a ``shape``.
  A different vocabulary size is reported as such.
  """
  embedding = 'token_embedder/embedding'
  if embedding in expected and embedding in saved:
    vocab, saved_vocab = expected[embedding].shape[0], saved[embedding].shape[0]
    if vocab != saved_vocab:
      raise UserError(f'{where}: its vocabulary has {saved_vocab} entries but the model\'s has '
                      f'{vocab} ({embedding}); use the vocabulary the checkpoint was trained with, '
                      'or set vocab_size to match')
  for name, leaf in expected.items():
    if name not in saved:
      raise UserError(f'{where} has no parameter {name} (expected shape {tuple(leaf.shape)})')
    if tuple(saved[name].shape) != tuple(leaf.shape):
      raise UserError(f'{where}: parameter {name} has shape {tuple(saved[name].shape)} but '
                      f'the model expects {tuple(leaf.shape)}')
  extra = sorted(set(saved) - set(expected))
  if extra:
    raise UserError(f'{where} has parameters this model does not: {", ".join(extra[:5])}')


def flatten_with_names(tree: Any) -> list[tuple[str, Any]]:
  """[('encoder/layers_0/mlp/wi_0/kernel', leaf), ...] in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [('/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path),
           leaf) for path, leaf in flat]


def _has_complete_state(checkpoint: Any) -> bool:
  """Whether the state item of ``checkpoint`` (an epath.Path) is there and completely saved.

  Locally Orbax gives unfinished saves a temporary name; on a bucket it writes in place and
  commits the item with COMMIT_FILE.
  """
  state = checkpoint / STATE_ITEM
  return (state / COMMIT_FILE).exists() if paths.is_url(checkpoint) else state.is_dir()


def find_checkpoints(path: str) -> list[tuple[int, str]]:
  """(step, directory) of the checkpoint ``path`` itself, or of every checkpoint in it, by step.

  Only complete checkpoints count (_has_complete_state).
  """
  directory = paths.resolve(path)
  if not directory.is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  path = os.fspath(directory)
  if (directory / STATE_ITEM).is_dir():
    if not _has_complete_state(directory):
      raise UserError(f'checkpoint {path!r} is unfinished: its {STATE_ITEM}/ has no {COMMIT_FILE}')
    step = directory.name[len(STEP_PREFIX) + 1:]
    return [(int(step) if step.isdigit() else 0, path)]
  found = []
  for child in directory.iterdir():
    step = child.name[len(STEP_PREFIX) + 1:] if child.name.startswith(STEP_PREFIX + '_') else ''
    if step.isdigit() and _has_complete_state(child):
      found.append((int(step), os.fspath(child)))
  if not found:
    raise UserError(f'{path} holds no checkpoints (no {STEP_PREFIX}_<step>/ directories)')
  return sorted(found)


RESTORE_MODES = ('specific', 'latest', 'all')


def select_checkpoints(config: RestoreCheckpointConfig) -> list[tuple[int, str]]:
  """(step, directory) of the checkpoints ``config`` names, in step order.

  ``mode='specific'``: ``path`` is one checkpoint directory. ``'latest'``: the newest
  checkpoint in the directory ``path`` (or ``path`` itself if it is a checkpoint).
  ``'all'``: every checkpoint in ``path``.
  """
  if config.mode not in RESTORE_MODES:
    raise UserError(f'RestoreCheckpointConfig.mode must be one of {", ".join(RESTORE_MODES)}, '
                    f'not {config.mode!r}')
  if not config.path:
    raise UserError('no checkpoint to restore: set CHECKPOINT_PATH')
  found = find_checkpoints(config.path)
  if config.mode == 'specific' and not (paths.resolve(config.path) / STATE_ITEM).is_dir():
    raise UserError(f"{config.path} is not a checkpoint directory (mode='specific'); name a "
                    f"{STEP_PREFIX}_<step> directory or use mode='latest'")
  return found[-1:] if config.mode == 'latest' else found


def _restore_error(path: str, error: Exception) -> UserError:
  """A UserError naming the checkpoint and, where the error says, the array it could not read."""
  text = str(error)
  arrays = re.findall(r"'path': '((?:params|opt_state|step)[^']*?)/?'", text)
  if arrays:
    name = arrays[0].replace('.', '/')
    return UserError(f'cannot restore {path}: {name} cannot be read, so the checkpoint is damaged '
                     '(truncated or corrupt). Earlier checkpoints are not affected; delete this one '
                     'to resume from them')
  first = text.strip().splitlines()[0] if text.strip() else repr(error)
  return UserError(f'cannot restore {path}: {first}')


def _restore_partial(path: str, wanted: dict[str, Any]) -> dict[str, Any]:
  """The items of ``wanted`` (abstract arrays with shardings) read from checkpoint ``path``."""
  item_dir = _item_dir(path)
  args = ocp.args.PyTreeRestore(item=wanted, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(wanted))
  _ignore_abandoned_reads()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(item_dir, args=args)
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises bare Exceptions for bad data)
    raise _restore_error(path, e) from e


def _is_abandoned_read(report: Any) -> bool:
  """Whether an unraisable-exception report comes from a read of a restore that already failed:
  its completion reaching a closed event loop, or its coroutine collected unfinished."""
  if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == 'Event loop is closed':
    return True
  code = getattr(report.object, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def _ignore_abandoned_reads() -> None:
  """Silences the reads a failed restore leaves in flight: they finish after Orbax has closed its
  event loop, and Python would print a traceback for each after the restore error."""
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_abandoned_reads', False):
    return

  def hook(report: Any) -> None:
    if not _is_abandoned_read(report):
      previous(report)

  hook.ignores_abandoned_reads = True
  sys.unraisablehook = hook


def _saved_state_tree(path: str) -> dict[str, Any]:
  """The metadata tree of the train state saved in checkpoint ``path``."""
  if not paths.resolve(path).is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  return saved_tree(_item_dir(path))


def _item_dir(path: str) -> str:
  """The train-state item of checkpoint directory ``path``."""
  return paths.join(paths.resolve(path), STATE_ITEM)


def _check_params(path: str, model_params: Any, saved: dict[str, Any]) -> None:
  """UserError unless checkpoint ``path`` (its ``saved`` tree) holds the model's parameters."""
  check_shapes(dict(flatten_with_names(model_params)),
               dict(flatten_with_names(saved.get('params', {}))), path)


_SCANNED_NAME = re.compile(r'(?:en|de)coder/layers/')


def _is_scanned(params: Any) -> bool:
  return any(_SCANNED_NAME.match(name) for name, _ in flatten_with_names(params))


def _layout_conversion(saved_params: Any, model_params: Any) -> Callable[[Any], Any] | None:
  """The function taking the checkpoint's parameters to the model's layer layout, if they differ
  (one was saved with ``scan_layers`` and the other is not)."""
  saved, model = _is_scanned(saved_params), _is_scanned(model_params)
  if saved == model:
    return None
  return network.stack_layers if model else network.unstack_layers


def _restore_converted(path: str, saved: dict[str, Any], abstract: TrainState,
                       convert: Callable[[Any], Any]) -> tuple[Any, Any]:
  """(step, parameters) of ``path`` in the model's layer layout and shardings.

  The saved arrays are read replicated and re-laid out on the devices, so a
  conversion needs each device to hold the whole model once.
  """
  mesh = jax.tree_util.tree_leaves(abstract.params)[0].sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  wanted = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=replicated),
      hf_interop.nest(dict(flatten_with_names(saved['params']))))
  try:
    converted = jax.eval_shape(convert, wanted)
  except (KeyError, ValueError, IndexError) as e:
    raise UserError(f'{path}: its parameters cannot be converted to the model\'s layer layout '
                    f'({e!r})') from e
  check_shapes(dict(flatten_with_names(abstract.params)), dict(flatten_with_names(converted)),
               path)
  restored = _restore_partial(path, {'step': abstract.step, 'params': wanted})
  shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, abstract.params)
  params = jax.jit(convert, out_shardings=shardings)(restored['params'])
  logging.warning('%s was saved %s scanned layers and the model %s them: its parameters were '
                  'converted, and the optimizer starts fresh.', path,
                  'with' if convert is network.unstack_layers else 'without',
                  'does not scan' if convert is network.unstack_layers else 'scans')
  return restored['step'], params


def restore_params(path: str, initializer: TrainStateInitializer) -> Any:
  """Only the parameters of checkpoint ``path``, in the initializer's shardings (for inference)."""
  abstract = _abstract(initializer.global_train_state_shape, initializer.train_state_shardings)
  saved = _saved_state_tree(path)
  convert = _layout_conversion(saved.get('params', {}), abstract.params)
  if convert is not None:
    return _restore_converted(path, saved, abstract, convert)[1]
  _check_params(path, abstract.params, saved)
  return _restore_partial(path, {'params': abstract.params})['params']


def _mapped_sources(names: Sequence[str], assignment_map: AssignmentMap) -> dict[str, str | None]:
  """Model parameter name -> the checkpoint's name for it (None: not restored)."""
  sources = {}
  for name in names:
    sources[name] = name
    for pattern, replacement in assignment_map:
      if re.fullmatch(pattern, name):
        sources[name] = None if replacement is None else re.sub(f'^(?:{pattern})$', replacement, name)
        break
  return sources


def _restore_mapped_params(path: str, initializer: TrainStateInitializer,
                           assignment_map: AssignmentMap, init_rng: jax.Array) -> TrainState:
  """Parameters renamed or left fresh by ``assignment_map``; the optimiser starts fresh."""
  abstract = _abstract(initializer.global_train_state_shape, initializer.train_state_shardings)
  expected = dict(flatten_with_names(abstract.params))
  saved = dict(flatten_with_names(saved_tree(_item_dir(path)).get('params', {})))
  sources = _mapped_sources(list(expected), assignment_map)
  wanted = {source: expected[name] for name, source in sources.items() if source is not None}
  check_shapes(wanted, {source: saved[source] for source in wanted if source in saved}, path)
  restored = dict(flatten_with_names(_restore_partial(path, {'params': hf_interop.nest(wanted)})['params']))
  fresh = initializer.from_scratch(init_rng)
  fresh_flat = dict(flatten_with_names(fresh.params))
  skipped = sorted(name for name, source in sources.items() if source is None)
  if skipped:
    logging.info('Left freshly initialised by the assignment map: %s', ', '.join(skipped))
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(fresh.params),
      [restored[sources[name]] if sources[name] is not None else fresh_flat[name]
       for name in expected])
  return initializer.from_params(params, jnp.zeros((), jnp.int32))


def restore_from_path(path: str, initializer: TrainStateInitializer,
                      assignment_map: AssignmentMap = (),
                      init_rng: jax.Array | None = None) -> TrainState:
  """The train state in the checkpoint directory ``path`` (e.g. ``.../checkpoint_1000``).

  Parameters must match the model's shapes. The optimiser state is restored when
  the checkpoint has one of the same structure; otherwise (a converted checkpoint,
  or another optimiser) it starts fresh. With an ``assignment_map`` (T5X's idea),
  each model parameter whose name fully matches a regex is read from the
  checkpoint's parameter named by the replacement (``re.sub``), or, for None, is
  freshly initialised; checkpoint parameters nobody reads are dropped, and the
  step and optimiser start from zero. A checkpoint saved with the other layer
  layout (``scan_layers``) has its parameters converted, and the optimiser
  starts fresh.
  """
  if not paths.resolve(path).is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  if assignment_map:
    return _restore_mapped_params(path, initializer, assignment_map,
                                  init_rng if init_rng is not None else jax.random.PRNGKey(0))
  abstract = _abstract(initializer.global_train_state_shape, initializer.train_state_shardings)
  saved = _saved_state_tree(path)
  convert = _layout_conversion(saved.get('params', {}), abstract.params)
  if convert is not None:
    step, params = _restore_converted(path, saved, abstract, convert)
    return initializer.from_params(params, step)
  _check_params(path, abstract.params, saved)
  restored, with_optimizer = _restore_train_state(path, abstract, saved)
  if with_optimizer:
    return abstract.replace_state_dict(restored)
  logging.info('%s has no matching optimizer state; the optimizer starts fresh.', path)
  return initializer.from_params(restored['params'], restored['step'])


def _restore_train_state(path: str, abstract: TrainState, saved: dict[str, Any]
                         ) -> tuple[dict[str, Any], bool]:
  """The step, parameters and (when its structure matches) optimiser state of ``path``."""
  with_optimizer = 'opt_state' in saved and _same_structure(saved['opt_state'], abstract.opt_state)
  wanted = {'step': abstract.step, 'params': abstract.params}
  if with_optimizer:
    wanted['opt_state'] = abstract.opt_state
  return _restore_partial(path, wanted), with_optimizer


def _same_structure(saved: Any, expected: Any) -> bool:
  """Whether two trees hold the same names with the same shapes (saved trees come key-sorted)."""
  shapes = lambda tree: {name: tuple(leaf.shape) for name, leaf in flatten_with_names(tree)}
  return shapes(saved) == shapes(expected)


def save_params(directory: str, params: Any, step: int = 0) -> str:
  """Writes ``directory/checkpoint_<step>/`` holding only the step and ``params`` (numpy or jax).

  Such a checkpoint is what converters write: training restores its parameters
  and starts the optimiser fresh.
  """
  target = checkpoint_dir(directory, step)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(_item_dir(target),
                    {'step': np.asarray(step, np.int32), 'params': params})
  checkpointer.wait_until_finished()
  checkpointer.close()
  return target


_DISK_FULL = {errno.ENOSPC: 'No space left on device', errno.EFBIG: 'File too large',
              errno.EDQUOT: 'Disk quota exceeded'}


def _disk_full_reason(error: BaseException) -> str | None:
  """The disk-full message in ``error`` or its causes (TensorStore and TF only give text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
      return _DISK_FULL[error.errno]
    for reason in _DISK_FULL.values():
      if reason in str(error):
        return reason
    error = error.__cause__ or error.__context__
  return None


def _cast_floats(tree: Any, dtype: str) -> Any:
  if dtype == 'float32':
    return tree
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class CheckpointManager:
  """Saves and restores TrainStates in their shardings with ``orbax.checkpoint``.

  Other items (the data iterator) are added with ``add_item`` and saved with
  every checkpoint. Unfinished saves left by a crash are removed on start-up.
  """

  def __init__(self, directory: str, save_config: SaveCheckpointConfig,
               state_shardings: TrainState, state_shape: TrainState):
    self._save_config = save_config
    self._abstract_state = _abstract(state_shape, state_shardings)
    self._extra_items: dict[str, Any] = {}
    self._writing = 0  # the step of the newest save started
    options = ocp.CheckpointManagerOptions(
        max_to_keep=save_config.keep, keep_period=save_config.keep_period,
        step_prefix=STEP_PREFIX, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=save_config.use_async)
    self._manager = ocp.CheckpointManager(paths.resolve(directory), options=options)

  @property
  def directory(self) -> str:
    return str(self._manager.directory)

  @property
  def save_config(self) -> SaveCheckpointConfig:
    return self._save_config

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def add_item(self, name: str, args: Any) -> None:
    """Saves ``args`` (Orbax checkpoint args, e.g. the data iterator's) with every checkpoint."""
    self._extra_items[name] = args

  def should_save(self, step: int) -> bool:
    """Whether the policy saves at ``step``: a multiple of the period, or one of ``steps``."""
    period = self._save_config.period
    return step > 0 and ((period is not None and step % period == 0) or
                         step in self._save_config.steps)

  def save(self, state: TrainState, force: bool = False) -> bool:
    """Starts saving ``state`` at its step if the policy says so (or ``force``)."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps() or not (force or self.should_save(step)):
      return False
    state_dict = state.state_dict()
    state_dict['params'] = _cast_floats(state_dict['params'], self._save_config.dtype)
    items = {STATE_ITEM: ocp.args.StandardSave(state_dict), **self._extra_items}
    with self._write_errors(step):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._writing = step
    return saved

  @contextlib.contextmanager
  def _write_errors(self, step: int) -> Iterator[None]:
    """A full disk while writing ``step`` becomes a TrainingError that says what is safe."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = _disk_full_reason(e)
      if reason is None:
        raise
      steps = [s for s in self._manager.all_steps() if s != step]
      kept = f'checkpoint_{max(steps)} and earlier are intact' if steps else 'no checkpoint is lost'
      raise TrainingError(f'cannot write {checkpoint_dir(self.directory, step)}: the disk is full '
                          f'({reason}); {kept}. Free some space and rerun to resume') from e

  def restore(self, step: int | None = None) -> TrainState | None:
    """The state at ``step`` (default: the newest), in its shardings; None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = checkpoint_dir(self.directory, step)
    saved = _saved_state_tree(path)
    if _layout_conversion(saved.get('params', {}), self._abstract_state.params) is not None:
      scanned = _is_scanned(saved.get('params', {}))
      raise UserError(f'{path} was saved {"with" if scanned else "without"} scan_layers and this '
                      'model differs: resume with the same network.T5Config.scan_layers, or start '
                      'a new MODEL_DIR from this checkpoint (INITIAL_CHECKPOINT_PATH), which '
                      'converts its parameters')
    _check_params(path, self._abstract_state.params, saved)
    abstract = self._abstract_state.state_dict()
    _ignore_abandoned_reads()
    try:
      args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
      restored = self._manager.restore(step, args=args)[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises bare Exceptions for bad data)
      raise _restore_error(path, e) from e
    return self._abstract_state.replace_state_dict(restored)

  def restore_item(self, step: int, name: str, args: Any) -> bool:
    """Restores item ``name`` of checkpoint ``step`` with ``args``; False if it has none."""
    if not (paths.resolve(checkpoint_dir(self.directory, step)) / name).is_dir():
      return False
    self._manager.restore(step, args=ocp.args.Composite(**{name: args}))
    return True

  def wait_until_finished(self) -> None:
    with self._write_errors(self._writing):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_or_initialize(manager: CheckpointManager, initializer: TrainStateInitializer,
                          restore_cfg: RestoreCheckpointConfig | None,
                          init_rng: jax.Array) -> tuple[TrainState, bool]:
  """The state to start from, and whether it is the directory's own (a resume).

  The newest checkpoint in the manager's directory wins; then ``restore_cfg``'s
  path; then a fresh state from ``init_rng``.
  """
  state = manager.restore()
  if state is not None:
    step = int(state.step)
    logging.info('Resuming from %s.', checkpoint_dir(manager.directory, step))
    if restore_cfg is not None and restore_cfg.path:
      logging.warning('*** %s already has checkpoints, so the run resumes from step %d and '
                      'the initial checkpoint %s is IGNORED. Use a new directory to start from '
                      'it. ***', manager.directory, step, restore_cfg.path)
    return state, True
  if restore_cfg is not None and restore_cfg.path:
    try:
      _, path = select_checkpoints(restore_cfg)[-1]
    except UserError as e:
      if not restore_cfg.fallback_to_scratch:
        raise
      logging.warning('%s; starting from scratch (fallback_to_scratch).', e)
      return initializer.from_scratch(init_rng), False
    logging.info('Initialising from %s.', path)
    return restore_from_path(path, initializer, restore_cfg.assignment_map, init_rng), False
  logging.info('Initialising from scratch.')
  return initializer.from_scratch(init_rng), False


def get_fallback_state(restore_cfg: RestoreCheckpointConfig, init_fn: Callable[[jax.Array], Any],
                       init_rng: jax.Array) -> Any | None:
  """``init_fn(init_rng)`` when the config may fall back to scratch, else None (T5X's helper)."""
  return init_fn(init_rng) if restore_cfg.fallback_to_scratch else None


class LegacyCheckpointManager:
  """T5X's notebook-facing checkpoint manager, over ``CheckpointManager``.

  ``train_state_shape`` is ``TrainStateInitializer.global_train_state_shape``, whose
  leaves carry their shardings. Saves wait until the checkpoint is written.
  """

  def __init__(self, save_cfg: SaveCheckpointConfig | None, restore_cfg: RestoreCheckpointConfig,
               train_state_shape: TrainState, partitioner: Any = None, ds_iter: Any = None,
               model_dir: str | None = None):
    del partitioner  # the shardings come with train_state_shape
    if ds_iter is not None:
      raise UserError('LegacyCheckpointManager saves no data iterator; pass ds_iter=None (the '
                      'train binary saves iterators itself)')
    self._restore_cfg = restore_cfg
    self._shape = train_state_shape
    shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, train_state_shape)
    self._manager = None
    if save_cfg is not None and model_dir is not None:
      self._manager = CheckpointManager(model_dir, dataclasses.replace(save_cfg, save_dataset=False),
                                        shardings, train_state_shape)

  def restore(self, paths: Sequence[str | None], restore_cfg: RestoreCheckpointConfig,
              fallback_state: Mapping[str, Any] | None = None) -> TrainState | None:
    """The state in the first of ``paths`` (by ``restore_cfg.mode``), or None if none is given.

    A checkpoint without a matching optimiser state takes it from ``fallback_state``.
    """
    paths = [path for path in paths if path]
    if not paths:
      return None
    try:
      _, path = select_checkpoints(dataclasses.replace(restore_cfg, path=paths[0]))[-1]
    except UserError:
      if restore_cfg.fallback_to_scratch:
        return None
      raise
    abstract = TrainState(step=self._shape.step, params=self._shape.params,
                          opt_state=self._shape.opt_state)
    saved = _saved_state_tree(path)
    _check_params(path, abstract.params, saved)
    restored, with_optimizer = _restore_train_state(path, abstract, saved)
    if with_optimizer:
      return abstract.replace_state_dict(restored)
    if fallback_state is None:
      raise UserError(f'{path} has no optimizer state for this optimizer; set '
                      'RestoreCheckpointConfig.fallback_to_scratch to start the optimizer fresh')
    return TrainState(step=restored['step'], params=restored['params'],
                      opt_state=fallback_state['opt_state'])

  def save(self, train_state: TrainState,
           state_transformation_fns: Sequence[Callable[[dict[str, Any]], dict[str, Any]]] = ()
           ) -> None:
    """Writes ``train_state`` (after the transformations) at its step and waits for it."""
    if self._manager is None:
      raise UserError('this LegacyCheckpointManager has no save_cfg and model_dir to save to')
    state_dict = train_state.state_dict()
    for transform in state_transformation_fns:
      state_dict = transform(state_dict)
    self._manager.save(train_state.replace_state_dict(state_dict), force=True)
    self._manager.wait_until_finished()
