"""Reading checkpoints: where they are, what they hold, and restoring them.

Restores go into the model's shardings after checking every parameter's shape
against the model, and convert between the per-layer and scanned layer layouts.
Errors name the checkpoint and, where Orbax says, the array it could not read.

Wherever a t5train checkpoint is read, a T5X checkpoint directory is read as it
is (its native msgpack + TensorStore format or its Orbax format, per-layer or
scanned): ``t5x_checkpoint`` reads its parameters and step on the host, and they
are placed into the model's shardings, in the model's layer layout. A T5X
checkpoint has no optimizer state that t5train reads, so training from one
starts the optimizer fresh at the checkpoint's step. Nothing converted is written.
"""

from __future__ import annotations

import contextlib
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
from etils import epath

from t5train import hf_interop, network, paths, t5x_checkpoint
from t5train.errors import UserError
from t5train.train_state import TrainState, TrainStateInitializer

STEP_PREFIX = 'checkpoint'
AssignmentMap = Sequence[tuple[str, str | None]]
# Each checkpoint directory holds named items; the train state is one of them.
STATE_ITEM = 'state'
# Orbax's mark of a complete save on an object store, where it cannot rename into place.
COMMIT_FILE = 'commit_success.txt'
# A checkpoint that leaves out its frozen parameters names the checkpoint holding them in this
# item (JSON: {"base_checkpoint": path, "frozen_parameters": count}).
BASE_ITEM = 'base'
# T5X's checkpoints: the msgpack file of its native format, and the item name Orbax gives a
# checkpoint's only item (T5X's Orbax path names its train-state item 'state', as t5train does).
T5X_NATIVE_FILE = 'checkpoint'
T5X_DEFAULT_ITEM = 'default'


def checkpoint_dir(model_dir: str, step: int) -> str:
  return paths.join(model_dir, f'{STEP_PREFIX}_{step}')


def abstract_state(state_shape: TrainState, state_shardings: TrainState) -> TrainState:
  return jax.tree_util.tree_map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      state_shape, state_shardings)


def saved_tree(item_dir: str) -> dict[str, Any]:
  """The saved tree's metadata (shapes and dtypes), without reading any array."""
  # The item's handler reads its own metadata file; a Checkpointer would also look for a step
  # metadata file inside the item directory (it is one level up) and warn on every read.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = getattr(handler.metadata(epath.Path(item_dir)), 'tree', None)
  except (FileNotFoundError, NotImplementedError, ValueError, TypeError):
    tree = None
  finally:
    handler.close()
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


def _has_complete_state(checkpoint: Any, item: str = STATE_ITEM) -> bool:
  """Whether the state item of ``checkpoint`` (an epath.Path) is there and completely saved.

  Locally Orbax gives unfinished saves a temporary name; on a bucket it writes in place and
  commits the item with COMMIT_FILE. (T5X's Orbax checkpoints are committed the same way.)
  """
  state = checkpoint / item
  return (state / COMMIT_FILE).exists() if paths.is_url(checkpoint) else state.is_dir()


def _is_complete_checkpoint(checkpoint: Any) -> bool:
  """Whether ``checkpoint`` (an epath.Path) is a complete t5train or T5X checkpoint.

  T5X's native format writes its msgpack file after the arrays, and into a
  temporary directory renamed when complete; T5X's Orbax format is committed as
  t5train's is, under the item name ``state`` (or Orbax's ``default``).
  """
  return ((checkpoint / T5X_NATIVE_FILE).is_file() or _has_complete_state(checkpoint)
          or _has_complete_state(checkpoint, T5X_DEFAULT_ITEM))


def is_t5x_checkpoint(path: str) -> bool:
  """Whether ``path`` is a T5X checkpoint directory (``checkpoint_<step>``, either T5X format)."""
  return t5x_checkpoint.checkpoint_format(os.fspath(paths.resolve(path))) is not None


def is_checkpoint_dir(path: str) -> bool:
  """Whether ``path`` is one checkpoint directory (t5train's or T5X's), not a model directory."""
  directory = paths.resolve(path)
  return ((directory / STATE_ITEM).is_dir() or (directory / T5X_NATIVE_FILE).is_file()
          or (directory / T5X_DEFAULT_ITEM).is_dir())


def find_checkpoints(path: str) -> list[tuple[int, str]]:
  """(step, directory) of the checkpoint ``path`` itself, or of every checkpoint in it, by step.

  Only complete checkpoints count (_is_complete_checkpoint). T5X checkpoints count
  as t5train's do, as ``path`` itself or as the ``checkpoint_<step>`` directories of
  a T5X model directory.
  """
  directory = paths.resolve(path)
  if not directory.is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  path = os.fspath(directory)
  if is_checkpoint_dir(path):
    if not _is_complete_checkpoint(directory):
      item = STATE_ITEM if (directory / STATE_ITEM).is_dir() else T5X_DEFAULT_ITEM
      raise UserError(f'checkpoint {path!r} is unfinished: its {item}/ has no {COMMIT_FILE}')
    step = directory.name[len(STEP_PREFIX) + 1:]
    if step.isdigit():
      return [(int(step), path)]
    # A checkpoint renamed by hand: a T5X checkpoint says its step, a t5train one counts as 0.
    return [(t5x_checkpoint.read_t5x_step(path) if is_t5x_checkpoint(path) else 0, path)]
  found = []
  for child in directory.iterdir():
    step = child.name[len(STEP_PREFIX) + 1:] if child.name.startswith(STEP_PREFIX + '_') else ''
    if step.isdigit() and _is_complete_checkpoint(child):
      found.append((int(step), os.fspath(child)))
  if not found:
    raise UserError(f'{path} holds no checkpoints (no {STEP_PREFIX}_<step>/ directories)')
  return sorted(found)



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


@contextlib.contextmanager
def read_errors(path: str) -> Iterator[None]:
  """Orbax's errors while reading checkpoint ``path`` become one UserError naming it."""
  _ignore_abandoned_reads()
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises bare Exceptions for bad data)
    raise _restore_error(path, e) from e


def base_checkpoint(path: str) -> str | None:
  """The checkpoint holding the frozen parameters that checkpoint ``path`` leaves out (None: it
  holds all of its parameters)."""
  item = paths.resolve(path) / BASE_ITEM
  if not item.is_dir():
    return None
  with read_errors(path), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    base = checkpointer.restore(os.fspath(item))['base_checkpoint']
  if not paths.resolve(base).is_dir():
    raise UserError(f'{path} holds only its trained parameters, and the checkpoint holding the '
                    f'frozen ones, {base}, does not exist any more')
  return base


def restore_partial(path: str, wanted: dict[str, Any]) -> dict[str, Any]:
  """The items of ``wanted`` (abstract arrays with shardings) read from checkpoint ``path``, and
  the parameters it leaves out from its base checkpoint."""
  if is_t5x_checkpoint(path):
    return _read_t5x(path, wanted)
  base = base_checkpoint(path)
  if base is not None and 'params' in wanted:
    return _restore_with_base(path, base, wanted)
  return _read(path, wanted)


def _read(path: str, wanted: dict[str, Any]) -> dict[str, Any]:
  """The items of ``wanted`` read from the train-state item of checkpoint ``path`` alone."""
  args = ocp.args.PyTreeRestore(item=wanted, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(wanted))
  with read_errors(path), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(item_dir(path), args=args)


def _restore_with_base(path: str, base: str, wanted: dict[str, Any]) -> dict[str, Any]:
  """``restore_partial`` of a checkpoint that leaves its frozen parameters to ``base``."""
  own_names = {name for name, _ in flatten_with_names(saved_tree(item_dir(path)).get('params', {}))}
  names_and_leaves = flatten_with_names(wanted['params'])
  own = {name: leaf for name, leaf in names_and_leaves if name in own_names}
  frozen = {name: leaf for name, leaf in names_and_leaves if name not in own_names}
  rest = {key: value for key, value in wanted.items() if key != 'params'}
  restored = _read(path, {**rest, 'params': hf_interop.nest(own)} if own else rest) if own or rest else {}
  values = dict(flatten_with_names(restored.get('params', {})))
  if frozen:
    values.update(flatten_with_names(
        restore_partial(base, {'params': hf_interop.nest(frozen)})['params']))
  restored['params'] = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(wanted['params']),
      [values[name] for name, _ in names_and_leaves])
  return restored


def _read_t5x(path: str, wanted: dict[str, Any]) -> dict[str, Any]:
  """``restore_partial`` of a T5X checkpoint: its parameters (in the layer layout that
  ``wanted`` names, per-layer or scanned) and step, read on the host and placed into the
  shardings and dtypes of ``wanted``."""
  unknown = sorted(set(wanted) - {'params', 'step'})
  if unknown:
    raise UserError(f'{path} is a T5X checkpoint: t5train reads its parameters and step, not '
                    f'its {", ".join(unknown)}')
  flat, step = t5x_checkpoint.read_t5x_checkpoint(path)
  flat = t5x_checkpoint.unscan_layers(flat)[0]
  restored: dict[str, Any] = {}
  if 'params' in wanted:
    names_and_leaves = flatten_with_names(wanted['params'])
    if any(_SCANNED_NAME.match(name) for name, _ in names_and_leaves):
      flat = _stack_on_host(flat)
    missing = [name for name, _ in names_and_leaves if name not in flat]
    if missing:
      raise UserError(f'{path} has no parameter {missing[0]}')
    values = []
    for name, leaf in names_and_leaves:
      values.append(_place(flat.pop(name), leaf))  # each host array is freed once placed
    restored['params'] = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(wanted['params']), values)
  if 'step' in wanted:
    restored['step'] = _place(np.asarray(step), wanted['step'])
  return restored


def _stack_on_host(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``network.stack_layers`` of flat host arrays: each stack's ``layers_<i>/...`` parameters
  stacked on a new leading axis as ``layers/...``."""
  layers: dict[str, dict[int, np.ndarray]] = {}
  stacked = {}
  for name, value in flat.items():
    match = re.fullmatch(r'((?:en|de)coder)/layers_(\d+)/(.+)', name)
    if match is None:
      stacked[name] = value
    else:
      layers.setdefault(f'{match.group(1)}/layers/{match.group(3)}', {})[int(match.group(2))] = value
  for name, by_index in layers.items():
    if sorted(by_index) == list(range(len(by_index))):
      stacked[name] = np.stack([by_index[i] for i in range(len(by_index))])
    else:  # layers missing in between: left as they are, for the shape check to name
      stacked.update({name.replace('/layers/', f'/layers_{i}/', 1): value
                      for i, value in by_index.items()})
  return stacked


def _place(value: np.ndarray, leaf: Any) -> jax.Array:
  """Host array ``value`` in the dtype and sharding of abstract array ``leaf``: each device
  receives only its own shard (on every host, in a multi-host run)."""
  value = np.asarray(value).astype(leaf.dtype, copy=False)
  return jax.make_array_from_callback(tuple(leaf.shape), leaf.sharding,
                                      lambda index: value[index])


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


def saved_state_tree(path: str) -> dict[str, Any]:
  """The metadata tree of the train state saved in checkpoint ``path``; its parameters include
  the frozen ones it leaves to its base checkpoint. A T5X checkpoint's holds its step and its
  parameters (per-layer, as ``t5x_checkpoint`` reads them), not its optimizer state."""
  if not paths.resolve(path).is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  if is_t5x_checkpoint(path):
    shapes = t5x_checkpoint.unscan_shapes(t5x_checkpoint.read_t5x_shapes(path))
    return {'step': jax.ShapeDtypeStruct((), jnp.int32),
            'params': hf_interop.nest({name: jax.ShapeDtypeStruct(shape, jnp.float32)
                                       for name, shape in shapes.items()})}
  saved = saved_tree(item_dir(path))
  base = base_checkpoint(path)
  if base is not None:
    params = dict(flatten_with_names(saved_state_tree(base).get('params', {})))
    params.update(flatten_with_names(saved.get('params', {})))
    saved['params'] = hf_interop.nest(params)
  return saved


def item_dir(path: str) -> str:
  """The train-state item of checkpoint directory ``path``."""
  return paths.join(paths.resolve(path), STATE_ITEM)


def check_resumable(path: str, model_params: Any) -> None:
  """UserError unless checkpoint ``path`` holds the model's parameters in the model's layer layout
  (a resume keeps the optimizer state, which no layout conversion carries over)."""
  saved = saved_state_tree(path)
  if layout_conversion(saved.get('params', {}), model_params) is not None:
    scanned = is_scanned(saved.get('params', {}))
    raise UserError(f'{path} was saved {"with" if scanned else "without"} scan_layers and this '
                    'model differs: resume with the same network.T5Config.scan_layers, or start '
                    'a new MODEL_DIR from this checkpoint (INITIAL_CHECKPOINT_PATH), which '
                    'converts its parameters')
  check_params(path, model_params, saved)


def check_params(path: str, model_params: Any, saved: dict[str, Any]) -> None:
  """UserError unless checkpoint ``path`` (its ``saved`` tree) holds the model's parameters."""
  check_shapes(dict(flatten_with_names(model_params)),
               dict(flatten_with_names(saved.get('params', {}))), path)


_SCANNED_NAME = re.compile(r'(?:en|de)coder/layers/')


def saved_for_model(path: str, model_params: Any) -> dict[str, Any]:
  """``saved_state_tree(path)``; a T5X checkpoint's parameters in the model's layer layout, which
  ``_read_t5x`` reads them in (stacked on the host, where the model scans its layers)."""
  saved = saved_state_tree(path)
  if is_scanned(model_params) and not is_scanned(saved.get('params', {})) and is_t5x_checkpoint(path):
    shapes = dict(flatten_with_names(saved['params']))
    stacked = _stack_on_host({name: np.broadcast_to(np.zeros((), np.float32), leaf.shape)
                              for name, leaf in shapes.items()})
    saved['params'] = hf_interop.nest({name: jax.ShapeDtypeStruct(value.shape, jnp.float32)
                                       for name, value in stacked.items()})
  return saved


# RestoreCheckpointConfig.dtype: the dtype that parameters are restored in (T5X's meaning).
def restore_dtype(dtype: Any) -> Any:
  """The floating dtype that ``RestoreCheckpointConfig.dtype`` names (None: none)."""
  if dtype is None:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    resolved = None
  if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
    raise UserError(f"RestoreCheckpointConfig.dtype must be a floating-point dtype such as "
                    f"'float32' or 'bfloat16' (or None), not {dtype!r}")
  return resolved


def _in_dtype(abstract_params: Any, dtype: Any) -> Any:
  """Abstract parameters whose floating leaves are of ``dtype`` (None: as they are)."""
  dtype = restore_dtype(dtype)
  if dtype is None:
    return abstract_params
  return jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, abstract_params)


def round_params(params: Any, dtype: Any) -> Any:
  """``params`` rounded to ``dtype`` and kept in their own dtypes: a training state starts from
  the values ``dtype`` holds while its parameters stay in the model's dtype (float32, which the
  optimizer updates)."""
  dtype = restore_dtype(dtype)
  if dtype is None:
    return params
  def rounded(x: Any) -> Any:
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits <= jnp.finfo(dtype).bits:
      return x
    return x.astype(dtype).astype(x.dtype)
  if all(not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits <= jnp.finfo(dtype).bits
         for x in jax.tree_util.tree_leaves(params)):
    return params
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
  return jax.jit(lambda tree: jax.tree_util.tree_map(rounded, tree),
                 out_shardings=shardings)(params)


def is_scanned(params: Any) -> bool:
  return any(_SCANNED_NAME.match(name) for name, _ in flatten_with_names(params))


def layout_conversion(saved_params: Any, model_params: Any) -> Callable[[Any], Any] | None:
  """The function taking the checkpoint's parameters to the model's layer layout, if they differ
  (one was saved with ``scan_layers`` and the other is not)."""
  saved, model = is_scanned(saved_params), is_scanned(model_params)
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
  restored = restore_partial(path, {'step': abstract.step, 'params': wanted})
  shardings = jax.tree_util.tree_map(lambda leaf: leaf.sharding, abstract.params)
  params = jax.jit(convert, out_shardings=shardings)(restored['params'])
  logging.warning('%s was saved %s scanned layers and the model %s them: its parameters were '
                  'converted, and the optimizer starts fresh.', path,
                  'with' if convert is network.unstack_layers else 'without',
                  'does not scan' if convert is network.unstack_layers else 'scans')
  return restored['step'], params


def restore_params(path: str, initializer: TrainStateInitializer, dtype: Any = None) -> Any:
  """Only the parameters of checkpoint ``path`` (t5train's or T5X's), in the initializer's
  shardings (for inference). ``dtype`` (``RestoreCheckpointConfig.dtype``; None: the model's)
  is the dtype of the restored floating-point parameters: 'bfloat16' halves their memory, as in
  T5X (the network computes in its activation dtype either way)."""
  abstract = abstract_state(initializer.global_train_state_shape, initializer.train_state_shardings)
  wanted = _in_dtype(abstract.params, dtype)
  saved = saved_for_model(path, abstract.params)
  convert = layout_conversion(saved.get('params', {}), abstract.params)
  if convert is not None:
    params = _restore_converted(path, saved, abstract, convert)[1]
    return jax.tree_util.tree_map(lambda x, leaf: x.astype(leaf.dtype), params, wanted)
  check_params(path, abstract.params, saved)
  if is_t5x_checkpoint(path):
    logging.info('%s is a T5X checkpoint; its parameters are read as they are.', path)
  return restore_partial(path, {'params': wanted})['params']


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


def restore_mapped(path: str, abstract: TrainState, assignment_map: AssignmentMap,
                   fresh_params: Callable[[], Any]) -> tuple[jax.Array, Any]:
  """(step, parameters) of checkpoint ``path`` read through ``assignment_map``, in the shardings
  of ``abstract`` (a TrainState of abstract arrays). Each model parameter is read from the
  checkpoint parameter its map entry names, or, where the entry is None, taken from
  ``fresh_params()`` (a tree like ``abstract.params``, called only then). The step is the
  checkpoint's (t5train's or T5X's, as T5X's assignment map keeps ``state/step``); 0 for a
  checkpoint without one."""
  expected = dict(flatten_with_names(abstract.params))
  t5x = is_t5x_checkpoint(path)
  saved_state = (saved_for_model(path, abstract.params) if t5x
                 else saved_tree(item_dir(path)))
  saved = dict(flatten_with_names(saved_state.get('params', {})))
  sources = _mapped_sources(list(expected), assignment_map)
  wanted = {source: expected[name] for name, source in sources.items() if source is not None}
  check_shapes(wanted, {source: saved[source] for source in wanted if source in saved}, path)
  wanted_state = {'params': hf_interop.nest(wanted)}
  if t5x or 'step' in saved_state:
    wanted_state['step'] = abstract.step
  restored_state = restore_partial(path, wanted_state)
  restored = dict(flatten_with_names(restored_state['params']))
  skipped = sorted(name for name, source in sources.items() if source is None)
  fresh_flat: dict[str, Any] = {}
  if skipped:
    logging.info('Left freshly initialised by the assignment map: %s', ', '.join(skipped))
    fresh_flat = dict(flatten_with_names(fresh_params()))
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(abstract.params),
      [restored[sources[name]] if sources[name] is not None else fresh_flat[name]
       for name in expected])
  step = restored_state.get('step')
  return (step if step is not None else jnp.zeros((), jnp.int32)), params


def _restore_mapped_params(path: str, initializer: TrainStateInitializer,
                           assignment_map: AssignmentMap, init_rng: jax.Array) -> TrainState:
  """``restore_mapped`` into a train state whose optimiser starts fresh, at the checkpoint's own
  step (t5train's or T5X's), so that ``TRAIN_STEPS`` counts from it as without a map."""
  abstract = abstract_state(initializer.global_train_state_shape, initializer.train_state_shardings)
  step, params = restore_mapped(path, abstract, assignment_map,
                                lambda: initializer.from_scratch(init_rng).params)
  return initializer.from_params(params, step)


def restore_from_path(path: str, initializer: TrainStateInitializer,
                      assignment_map: AssignmentMap = (),
                      init_rng: jax.Array | None = None, dtype: Any = None) -> TrainState:
  """The train state in the checkpoint directory ``path`` (e.g. ``.../checkpoint_1000``).

  Parameters must match the model's shapes. The optimiser state is restored when
  the checkpoint has one of the same structure; otherwise (a converted checkpoint,
  or another optimiser) it starts fresh. With an ``assignment_map`` (T5X's idea),
  each model parameter whose name fully matches a regex is read from the
  checkpoint's parameter named by the replacement (``re.sub``), or, for None, is
  freshly initialised; checkpoint parameters nobody reads are dropped, the step
  is the checkpoint's (as T5X's map keeps it), and the optimiser starts fresh. A
  checkpoint saved with the other layer layout (``scan_layers``) has its
  parameters converted, and the optimiser starts fresh. A T5X checkpoint gives
  its parameters and its step; the optimiser starts fresh. ``dtype`` (``RestoreCheckpointConfig.dtype``): the
  parameters start from their values rounded to it ('bfloat16': T5X's restored
  values), kept in the model's dtype for the optimizer.
  """
  if not paths.resolve(path).is_dir():
    raise UserError(f'checkpoint {path!r} does not exist or is not a directory')
  restore_dtype(dtype)  # a bad dtype fails before anything is read
  state = _restore_state(path, initializer, assignment_map, init_rng)
  rounded = round_params(state.params, dtype)
  return state if rounded is state.params else state.replace(params=rounded)


def _restore_state(path: str, initializer: TrainStateInitializer, assignment_map: AssignmentMap,
                   init_rng: jax.Array | None) -> TrainState:
  if assignment_map:
    return _restore_mapped_params(path, initializer, assignment_map,
                                  init_rng if init_rng is not None else jax.random.PRNGKey(0))
  abstract = abstract_state(initializer.global_train_state_shape, initializer.train_state_shardings)
  saved = saved_for_model(path, abstract.params)
  convert = layout_conversion(saved.get('params', {}), abstract.params)
  if convert is not None:
    step, params = _restore_converted(path, saved, abstract, convert)
    return initializer.from_params(params, step)
  check_params(path, abstract.params, saved)
  restored, with_optimizer = restore_train_state(path, abstract, saved)
  if with_optimizer:
    return abstract.replace_state_dict(restored)
  if is_t5x_checkpoint(path):
    logging.info('%s is a T5X checkpoint: its parameters are read as they are, training goes on '
                 'from its step %d, and the optimizer starts fresh.', path, int(restored['step']))
  else:
    logging.info('%s has no matching optimizer state; the optimizer starts fresh.', path)
  return initializer.from_params(restored['params'], restored['step'])


def restore_train_state(path: str, abstract: TrainState, saved: dict[str, Any]
                         ) -> tuple[dict[str, Any], bool]:
  """The step, parameters and (when its structure matches) optimiser state of ``path``."""
  with_optimizer = 'opt_state' in saved and _same_structure(saved['opt_state'], abstract.opt_state)
  wanted = {'step': abstract.step, 'params': abstract.params}
  if with_optimizer:
    wanted['opt_state'] = abstract.opt_state
  return restore_partial(path, wanted), with_optimizer


def _same_structure(saved: Any, expected: Any) -> bool:
  """Whether two trees hold the same names with the same shapes (saved trees come key-sorted)."""
  shapes = lambda tree: {name: tuple(leaf.shape) for name, leaf in flatten_with_names(tree)}
  return shapes(saved) == shapes(expected)


