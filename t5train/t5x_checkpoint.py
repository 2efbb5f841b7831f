"""Reading T5X checkpoints into t5train's parameter layout.

Responsible for: telling a T5X checkpoint directory from anything else
(``checkpoint_format``), and finding the model parameters (T5X's ``target``
subtree), their shapes and the step in a T5X checkpoint directory written either by T5X's native
``t5x.checkpoints.Checkpointer`` (msgpack plus TensorStore zarr arrays) or by its
Orbax path, and returning them as host float32 numpy arrays keyed by t5train's
'/'-joined parameter paths. T5X and t5train share parameter names and layouts,
so no transposing happens here. Checkpoints of T5X's scanned models
(``t5x/examples/scalable_t5``: each stack's layers stacked on axis 1 of every
parameter under ``<stack>/layers/``, with a relative-position table per layer
named ``relative_posemb``) are read back into per-layer parameters
(``unscan_layers``).

Must not: import TensorFlow, place arrays on accelerators, restore or convert the
optimizer state, write anything, or build t5train train states (callers do
that with the returned arrays).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from t5train import paths
from t5train.errors import UserError

# The msgpack file T5X's native Checkpointer writes in each checkpoint_<step> directory.
_NATIVE_FILE = 'checkpoint'
# Orbax files: the step-level metadata, and the per-item tree metadata.
_ORBAX_STEP_METADATA = '_CHECKPOINT_METADATA'
_ORBAX_TREE_METADATA = '_METADATA'
# T5X's Orbax path saves the train state as the item 'state'; Orbax's default item name is 'default'.
_ORBAX_ITEM_NAMES = ('state', 'default')
# T5X's scanned layers (nn_partitioning.scan_with_axes): '<stack>/layers/...', the layers on the
# axis of its T5Config.param_scan_axis, 1 by default.
_SCANNED = re.compile(r'(encoder|decoder)/layers/(.+)')
SCAN_AXIS = 1
# T5X's scalable_t5 names its per-layer relative-position table so; t5train names it relpos_bias.
_T5X_LAYER_RELPOS = 'relative_posemb/'


def unscan_layers(flat: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """T5X's scanned parameters as per-layer ones (``<stack>/layers_<i>/...``), and the number of
  layers each scanned stack holds; parameters that are not scanned pass through."""
  per_layer: dict[str, np.ndarray] = {}
  counts: dict[str, int] = {}
  for name, value in flat.items():
    match = _SCANNED.fullmatch(name)
    if match is None:
      per_layer[name] = value
      continue
    stack, rest = match.groups()
    if value.ndim <= SCAN_AXIS:
      raise UserError(f'{name} has shape {value.shape}: a scanned T5X parameter needs its layers '
                      f'on axis {SCAN_AXIS}')
    count = value.shape[SCAN_AXIS]
    if counts.setdefault(stack, count) != count:
      raise UserError(f'{name} stacks {count} layers but other {stack} parameters stack '
                      f'{counts[stack]}')
    if rest.startswith(_T5X_LAYER_RELPOS):
      rest = 'relpos_bias/' + rest[len(_T5X_LAYER_RELPOS):]
    for i in range(count):
      per_layer[f'{stack}/layers_{i}/{rest}'] = np.take(value, i, axis=SCAN_AXIS)
  return per_layer, counts


def unscan_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """``unscan_layers`` of parameter shapes: the per-layer parameters' shapes."""
  per_layer: dict[str, tuple[int, ...]] = {}
  for name, shape in shapes.items():
    match = _SCANNED.fullmatch(name)
    if match is None or len(shape) <= SCAN_AXIS:
      per_layer[name] = tuple(shape)
      continue
    stack, rest = match.groups()
    if rest.startswith(_T5X_LAYER_RELPOS):
      rest = 'relpos_bias/' + rest[len(_T5X_LAYER_RELPOS):]
    for i in range(shape[SCAN_AXIS]):
      per_layer[f'{stack}/layers_{i}/{rest}'] = tuple(shape[:SCAN_AXIS]) + tuple(shape[SCAN_AXIS + 1:])
  return per_layer


def checkpoint_format(path: str) -> str | None:
  """'native' or 'orbax' when ``path`` is a T5X checkpoint directory, else None.

  A T5X checkpoint directory holds T5X's msgpack file ``checkpoint`` (native
  format), or an Orbax item (``state``, or Orbax's ``default``) whose tree has
  T5X's ``target`` (the model parameters) where a t5train checkpoint has
  ``params``. Reads at most the item's tree metadata, and never raises: a
  t5train checkpoint, a model directory or a missing path give None.
  """
  try:
    directory = epath.Path(os.fspath(path))
    if (directory / _NATIVE_FILE).is_file():
      return 'native'
    item = _orbax_item_dir(os.fspath(path))
    if item is None:
      return None
    keys = _orbax_top_level_keys(item)
  except Exception:  # pylint: disable=broad-except  (unreadable: not recognisably T5X's)
    return None
  return 'orbax' if 'target' in keys and 'params' not in keys else None


def read_t5x_checkpoint(path: str) -> tuple[dict[str, np.ndarray], int]:
  """``read_t5x_params`` and ``read_t5x_step`` of ``path`` at once, reading the tree once."""
  path = os.fspath(path)
  if _format(path) == 'native':
    tree = _native_tree(path)
    target = tree.get('target')
    if not isinstance(target, dict):
      raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
    state = tree.get('state')
    step = state.get('step') if isinstance(state, dict) else None
    arrays = _read_native_leaves(path, _flatten(target))
    if step is not None:
      step = _read_native_leaves(path, {'state/step': step}, np.int64)['state/step']
    return arrays, _step_or_name(path, step)
  restored = _orbax_restore(path, with_target=True)
  target = restored.get('target')
  if not isinstance(target, dict):
    raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
  state = restored.get('state')
  step = state.get('step') if isinstance(state, dict) else None
  return ({key: np.asarray(value, np.float32) for key, value in _flatten(target).items()},
          _step_or_name(path, step))


def read_t5x_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """The shapes of the model parameters of a T5X checkpoint directory, as saved (scanned
  parameters stay scanned; see ``unscan_shapes``), without reading any array."""
  path = os.fspath(path)
  if _format(path) == 'native':
    target = _native_tree(path).get('target')
    if not isinstance(target, dict):
      raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
    return {key: tuple(value['metadata']['shape']) if _is_ts_spec(value)
            else tuple(np.shape(value)) for key, value in _flatten(target).items()}
  import orbax.checkpoint as ocp

  item = _orbax_item_dir(path)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(item)).tree
  except Exception as e:
    raise UserError(f'{path}: cannot read the Orbax T5X checkpoint\'s metadata at {item}: {e}') from e
  finally:
    handler.close()
  target = tree.get('target') if isinstance(tree, Mapping) else None
  if not isinstance(target, Mapping):
    raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(_plain_dict(target), sep='/')
  return {key: tuple(value.shape) for key, value in flat.items()}


def _plain_dict(tree: Any) -> Any:
  """Orbax's metadata tree as nested dicts."""
  if isinstance(tree, Mapping):
    return {key: _plain_dict(value) for key, value in tree.items()}
  return tree


def _step_or_name(path: str, step: Any) -> int:
  if step is not None:
    return int(np.asarray(step))
  return _step_from_name(path)


def _step_from_name(path: str) -> int:
  # The directory name T5X gives each checkpoint: checkpoint_<step>.
  match = re.fullmatch(r'checkpoint_(\d+)', os.path.basename(os.path.normpath(path)))
  if match is None:
    raise UserError(f'{path}: the T5X checkpoint holds no step and its name is not checkpoint_<step>')
  return int(match.group(1))


def read_t5x_params(path: str) -> dict[str, np.ndarray]:
  """Model parameters of a T5X checkpoint directory (e.g. ``.../checkpoint_1000``), either format.

  Returns float32 numpy arrays keyed like 'encoder/layers_0/attention/query/kernel';
  the optimizer state is not read.
  """
  path = os.fspath(path)
  if _format(path) == 'native':
    target = _native_tree(path).get('target')
    if not isinstance(target, dict):
      raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
    return _read_native_leaves(path, _flatten(target))
  restored = _orbax_restore(path, with_target=True)
  target = restored.get('target')
  if not isinstance(target, dict):
    raise UserError(f'{path}: the T5X checkpoint has no "target" (model parameters) subtree')
  return {key: np.asarray(value, np.float32) for key, value in _flatten(target).items()}


def read_t5x_step(path: str) -> int:
  """The training step a T5X checkpoint directory was saved at, in either format."""
  path = os.fspath(path)
  if _format(path) == 'native':
    state = _native_tree(path).get('state')
    step = state.get('step') if isinstance(state, dict) else None
    if step is not None:
      return int(_read_native_leaves(path, {'state/step': step}, np.int64)['state/step'])
  else:
    state = _orbax_restore(path, with_target=False).get('state')
    step = state.get('step') if isinstance(state, dict) else None
    if step is not None:
      return int(np.asarray(step))
  return _step_from_name(path)


def _format(path: str) -> str:
  """'native' or 'orbax'; a UserError naming ``path`` when it is neither."""
  if not epath.Path(path).is_dir():
    raise UserError(f'{path}: not a T5X checkpoint directory (it does not exist or is not a directory)')
  if (epath.Path(path) / _NATIVE_FILE).is_file():
    return 'native'
  if _orbax_item_dir(path) is not None:
    return 'orbax'
  raise UserError(f'{path}: not a T5X checkpoint directory: it has neither a "{_NATIVE_FILE}" file '
                  f'(T5X native format) nor Orbax metadata '
                  f'({_ORBAX_STEP_METADATA} or {_ORBAX_TREE_METADATA})')


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """'/'-joined paths to leaves; a TensorStore placeholder dict counts as one leaf."""
  from flax import traverse_util  # flax is slow to import; this module stays cheap to import

  return traverse_util.flatten_dict(dict(tree), sep='/',
                                    is_leaf=lambda _, value: _is_ts_spec(value))


# --- T5X native format -------------------------------------------------------------------------


def _native_tree(path: str) -> dict[str, Any]:
  """The train state in the msgpack file: {'target': params, 'state': {'step', 'param_states'}}."""
  # Imported here so that merely importing this module stays cheap.
  from flax import serialization

  file = paths.join(path, _NATIVE_FILE)
  try:
    # flax's reader, since T5X writes the file with flax.serialization (it may chunk large arrays).
    tree = serialization.msgpack_restore(epath.Path(file).read_bytes())
  except Exception as e:  # msgpack raises several unrelated types for corrupt input.
    raise UserError(f'{file}: not a T5X checkpoint file (cannot decode it as msgpack: {e})') from e
  # T5X writes {'version': 3, 'optimizer': {'target': ..., 'state': ...}}.
  tree = tree.get('optimizer', tree) if isinstance(tree, dict) else None
  if not isinstance(tree, dict):
    raise UserError(f'{file}: not a T5X checkpoint file (its msgpack holds no state tree)')
  return tree


def _is_ts_spec(value: Any) -> bool:
  # T5X replaces each array it writes to TensorStore by that array's spec, e.g.
  # {'driver': 'zarr', 'dtype': 'float32', 'kvstore': {'driver': 'file', 'path': 'target.a.b/'},
  #  'metadata': {'shape': [...], 'chunks': [...], 'compressor': {...}}}, with a path relative
  # to the checkpoint directory. T5X itself tells specs from subtrees by these keys.
  return isinstance(value, Mapping) and {'driver', 'kvstore', 'metadata'} <= set(value)


def _local_zarr_spec(path: str, spec: Mapping[str, Any]) -> dict[str, Any]:
  """A spec opening the array of a T5X placeholder ``spec`` under checkpoint directory ``path``."""
  kvstore = spec.get('kvstore') or {}
  # tensorstore>=0.1.14 puts the relative path in the kvstore; older T5X (and checkpoints written
  # to gs://, whose kvstore is gcs with a dummy bucket) put it at the top level. Either way the
  # array lies in the checkpoint directory, read here wherever that directory is.
  relative = kvstore.get('path') if isinstance(kvstore, Mapping) else None
  relative = relative or spec.get('path')
  if not relative:
    raise UserError(f'{path}: a TensorStore spec in the T5X checkpoint names no path: {dict(spec)}')
  # TensorStore rejects file paths with '.' or '..' components, so the path is normalised; the
  # trailing '/' marks the array as a directory of chunk files.
  if paths.is_url(path):  # TensorStore takes the URL of a gs:// (or other) store as the kvstore
    scheme, _, rest = path.partition('://')
    url = f'{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}/'
    return {'driver': spec.get('driver', 'zarr'), 'kvstore': url}
  absolute = os.path.normpath(os.path.join(os.path.abspath(path), relative)) + '/'
  return {'driver': spec.get('driver', 'zarr'), 'kvstore': {'driver': 'file', 'path': absolute}}


def _read_native_leaves(path: str, flat: Mapping[str, Any], dtype: Any = np.float32
                        ) -> dict[str, np.ndarray]:
  """Arrays for msgpack leaves: inline arrays as they are, placeholders read with TensorStore."""
  import tensorstore as ts

  arrays: dict[str, np.ndarray] = {}
  pending = {}
  for key, value in flat.items():
    if _is_ts_spec(value):
      spec = _local_zarr_spec(path, value)
      try:
        pending[key] = (spec, ts.open(spec, read=True))
      except Exception as e:  # An invalid spec fails at once, before any I/O.
        raise UserError(f'{path}: cannot open the array for {key} with spec {spec}: {e}') from e
    else:
      # T5X keeps unpartitioned arrays (and scalars such as the step) inline in the msgpack.
      arrays[key] = np.asarray(value, dtype)
  # Opens, then reads, are issued for every array before waiting on any, so they overlap.
  reads = {}
  for key, (spec, opening) in pending.items():
    try:
      reads[key] = (spec, opening.result().read())
    except Exception as e:
      raise UserError(f'{path}: cannot open the array for {key} at {spec["kvstore"]["path"]}: {e}') from e
  for key, (spec, reading) in reads.items():
    try:
      array = np.asarray(reading.result())
    except Exception as e:
      raise UserError(f'{path}: cannot read the array for {key} at {spec["kvstore"]["path"]}: {e}') from e
    expected = flat[key].get('metadata', {}).get('shape')
    if expected is not None and list(array.shape) != list(expected):
      raise UserError(f'{path}: the array for {key} at {spec["kvstore"]["path"]} has shape '
                      f'{list(array.shape)}, but the checkpoint says {list(expected)}')
    arrays[key] = array.astype(dtype)
  return arrays


# --- T5X Orbax format --------------------------------------------------------------------------


def _orbax_item_dir(path: str) -> str | None:
  """The Orbax PyTree item holding the train state, or None when ``path`` has none."""
  directory = epath.Path(path)
  for name in _ORBAX_ITEM_NAMES:
    if (directory / name / _ORBAX_TREE_METADATA).is_file():
      return paths.join(path, name)
  if (directory / _ORBAX_TREE_METADATA).is_file():
    return path  # The item directory itself was given.
  if (directory / _ORBAX_STEP_METADATA).is_file():
    # A step directory whose item lacks tree metadata (older Orbax): let Orbax try the item.
    for name in _ORBAX_ITEM_NAMES:
      if (directory / name).is_dir():
        return paths.join(path, name)
  return None


def _orbax_top_level_keys(item: str) -> set[str]:
  """The top-level keys of the tree saved in Orbax item directory ``item``.

  Read from the item's JSON tree metadata (each leaf's key path), or, where
  that has another form, through Orbax.
  """
  metadata_file = epath.Path(item) / _ORBAX_TREE_METADATA
  if metadata_file.is_file():
    try:
      tree = json.loads(metadata_file.read_text()).get('tree_metadata')
    except ValueError:
      tree = None
    if isinstance(tree, Mapping) and tree:
      keys = set()
      for leaf in tree.values():
        path = leaf.get('key_metadata') if isinstance(leaf, Mapping) else None
        if path:
          keys.add(str(path[0].get('key')))
      if keys:
        return keys
  import orbax.checkpoint as ocp

  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(item)).tree
  finally:
    handler.close()
  return set(tree) if isinstance(tree, Mapping) else set()


def _orbax_restore(path: str, with_target: bool) -> dict[str, Any]:
  """Restores ``state/step`` (and ``target`` if asked) as numpy arrays, leaving optimizer slots unread."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  item = _orbax_item_dir(path)
  if item is None:
    raise UserError(f'{path}: no Orbax item ({" or ".join(_ORBAX_ITEM_NAMES)}) in the T5X checkpoint')
  # The handler, not a Checkpointer: a Checkpointer also looks for step metadata inside the item
  # directory and logs a warning when (as in T5X checkpoints) it is one level up.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(item)).tree
    wanted: dict[str, Any] = {}
    if with_target and 'target' in tree:
      wanted['target'] = tree['target']
    if isinstance(tree.get('state'), Mapping) and 'step' in tree['state']:
      wanted['state'] = {'step': tree['state']['step']}
    if not wanted:
      return {}
    # restore_type=np.ndarray reads to host memory, with no sharding or device needed.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    return handler.restore(epath.Path(item), args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))
  except UserError:
    raise
  except Exception as e:
    raise UserError(f'{path}: cannot read the Orbax T5X checkpoint at {item}: {e}') from e
  finally:
    handler.close()
