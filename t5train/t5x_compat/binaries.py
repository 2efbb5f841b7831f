"""T5X's arguments of ``train``, ``infer`` and ``evaluate``, accepted by t5train's.

T5X's run files bind ``train_script.train`` with T5X's argument names (``trainer_cls``,
``checkpoint_cfg = @utils.CheckpointConfig()``, ``stats_period``, ``summarize_config_fn``,
``inference_evaluator_cls``, ...). ``accepts_t5x_arguments`` extends a binary's function with
the T5X arguments it lacks (keyword-only, visible to gin through the signature) and turns
them into its own before calling it: honoured where t5train has the setting, accepted where
the argument changes nothing here, and refused with a ``UserError`` saying why otherwise.
There is still one function per binary, so ``--gin.train.eval_period=10`` reaches it whether
a gin file says ``import __main__ as train_script`` or ``from t5train import train``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

import gin
from t5train.errors import UserError
from t5train.t5x_compat._args import UNSET, require

# T5X's arguments of each binary's function that t5train's may lack.
T5X_ARGUMENTS = {
    'train': ('trainer_cls', 'stats_period', 'relative_steps', 'use_hardware_rng',
              'summarize_config_fn', 'inference_evaluator_cls', 'get_dataset_fn',
              'concurrent_metrics', 'actions', 'train_eval_get_dataset_fn',
              'run_eval_before_training', 'train_state_initializer_cls', 'use_orbax',
              'verify_matching_vocabs_fn', 'gc_period'),
    # shard_id and num_shards are t5train's own arguments of infer (each job infers its shard).
    'infer': ('checkpoint_period', 'merge_chunked_results',
              'write_fn', 'checkpoint_ds_iter', 'train_state_initializer_cls',
              'fallback_init_rng', 'merge_fn', 'summarize_config_fn',
              'verify_matching_vocabs_fn', 'output_vocab_feature_name', 'file_extension',
              'keep_aux_as_numpy', 'use_orbax'),
    'evaluate': ('inference_evaluator_cls', 'training_evaluator_cls', 'summarize_config_fn',
                 'train_state_initializer_cls', 'train_eval_get_dataset_fn',
                 'fallback_init_rng', 'use_orbax'),
}


def _underlying(value: Any) -> Any:
  """The function or class behind gin's configurable wrappers of it."""
  seen = 0
  while hasattr(value, '__wrapped__') and seen < 10:
    value = value.__wrapped__
    seen += 1
  return value


def _is(value: Any, *expected: Any) -> bool:
  """Whether ``value`` is one of ``expected`` (functions or classes), through gin's wrappers."""
  value = _underlying(value)
  for item in expected:
    if value is item or value is _underlying(item):
      return True
    if inspect.isclass(value) and inspect.isclass(item) and issubclass(value, item):
      return True
  return False


def _bindings(configurable: Any) -> dict[str, Any]:
  """The gin bindings of a configurable passed uncalled (``@trainer.Trainer``), or {}.

  They configure the run as the configurable's call would, so they are recorded in gin's
  operative config (``config.gin``, and the report of bindings that configure nothing).
  """
  # Gin hands over a class as a dynamic subclass of the registered one.
  candidates = configurable.__mro__[:-1] if inspect.isclass(configurable) else (configurable,)
  for candidate in candidates:
    registered = gin.config._inverse_lookup(candidate)  # pylint: disable=protected-access
    if registered is None:
      continue
    bindings = gin.get_bindings(candidate, resolve_references=False)
    scope = '/'.join(gin.current_scope())
    with gin.config._OPERATIVE_CONFIG_LOCK:  # pylint: disable=protected-access
      gin.config._OPERATIVE_CONFIG.setdefault(  # pylint: disable=protected-access
          (scope, registered.selector), {}).update(bindings)
    return gin.get_bindings(candidate)
  return {}


def _refuse_unless_default(name: str, value: Any, *accepted: Any, why: str) -> None:
  if value is UNSET or value is None or _is(value, *accepted):
    return
  raise UserError(f'{name} = {value!r} is not supported by t5train ({why})')


def _t5x_default_functions() -> dict[str, tuple[Any, ...]]:
  from t5train import train_state  # pylint: disable=g-import-not-at-top
  from t5train.t5x_compat import gin_utils, utils  # pylint: disable=g-import-not-at-top
  return {
      'summarize_config_fn': (gin_utils.summarize_gin_config,),
      'get_dataset_fn': (utils.get_dataset,),
      'train_eval_get_dataset_fn': (utils.get_training_eval_datasets,),
      'train_state_initializer_cls': (train_state.TrainStateInitializer,),
      'verify_matching_vocabs_fn': (utils.verify_matching_vocabs,),
  }


def _check_common(program: str, t5x: dict[str, Any]) -> None:
  """The arguments train, infer and evaluate share: T5X's defaults only, or no effect here."""
  defaults = _t5x_default_functions()
  reasons = {
      'summarize_config_fn': 't5train writes the operative config (config.gin) itself',
      'get_dataset_fn': 't5train reads DatasetConfig with seqio itself',
      'train_eval_get_dataset_fn': 't5train reads train_eval_dataset_cfg with seqio itself',
      'train_state_initializer_cls': 't5train builds the train state itself',
      'verify_matching_vocabs_fn': "t5train checks the task's vocabularies against the model's",
  }
  for name, why in reasons.items():
    _refuse_unless_default(f'{program}.{name}', t5x.pop(name, UNSET), *defaults[name], why=why)
  if t5x.get('use_orbax', UNSET) is not UNSET:
    require(f'{program}.use_orbax', t5x.pop('use_orbax'), True,
            't5train reads and writes Orbax checkpoints')
  if t5x.get('fallback_init_rng', UNSET) is not UNSET:
    require(f'{program}.fallback_init_rng', t5x.pop('fallback_init_rng'), None,
            'inference reads every parameter from the checkpoint')


def _evaluator_num_examples(evaluator_cls: Any, program: str) -> Any:
  """``num_examples`` bound to T5X's ``inference_evaluator_cls = @seqio.Evaluator``; its
  loggers must be seqio's standard ones (t5train's evaluation writes TensorBoard and JSONL)."""
  import seqio  # pylint: disable=g-import-not-at-top  (TensorFlow is slow to import)
  if not _is(evaluator_cls, seqio.Evaluator):
    raise UserError(f'{program}.inference_evaluator_cls = {evaluator_cls!r} is not supported by '
                    't5train (its evaluation runs seqio.Evaluator itself); leave it at '
                    '@seqio.Evaluator')
  bindings = _bindings(evaluator_cls)
  standard = (seqio.PyLoggingLogger, seqio.TensorBoardLogger, seqio.JSONLogger)
  for logger in bindings.get('logger_cls', ()) or ():
    if not _is(logger, *standard):
      raise UserError(f'seqio.Evaluator.logger_cls: {logger!r} is not supported by t5train (its '
                      'evaluation logs to TensorBoard and JSONL); use seqio\'s standard loggers')
  json_logger = _bindings(seqio.JSONLogger)
  require('seqio.JSONLogger.write_n_results', json_logger.get('write_n_results'), None,
          "t5train's evaluation writes every result")
  return bindings.get('num_examples', UNSET)


def _start_step(model_dir: str, restore_cfg: Any) -> int:
  """The step a run starts from: the newest checkpoint of ``model_dir``, else of the restore
  path, else 0 (what T5X's ``relative_steps`` counts from)."""
  from t5train import checkpoint_reading  # pylint: disable=g-import-not-at-top
  for path in (model_dir, getattr(restore_cfg, 'path', None)):
    if not path:
      continue
    try:
      found = checkpoint_reading.find_checkpoints(path)
    except (UserError, OSError, ValueError):
      found = []
    if found:
      return int(found[-1][0])
  return 0


def _translate_train(kwargs: dict[str, Any], t5x: dict[str, Any]) -> dict[str, Any]:
  from t5train.t5x_compat import trainer, utils  # pylint: disable=g-import-not-at-top
  program = 'train'
  checkpoint_cfg = kwargs.get('checkpoint_cfg')
  if isinstance(checkpoint_cfg, utils.CheckpointConfig):
    if checkpoint_cfg.save is None:
      raise UserError('utils.CheckpointConfig.save = None is not supported by t5train (it '
                      'saves at least the last step); bind save = @utils.SaveCheckpointConfig()')
    kwargs['checkpoint_cfg'] = checkpoint_cfg.save
    restore = checkpoint_cfg.restore
    if restore is not None and restore.path:
      if kwargs.get('restore_checkpoint_cfg') is not None:
        raise UserError('train has both checkpoint_cfg.restore (T5X) and restore_checkpoint_cfg '
                        '(t5train); bind one of them')
      if restore.mode == 'all':
        raise UserError("utils.RestoreCheckpointConfig.mode = 'all' is not supported in "
                        "training (as in T5X); use 'specific' or 'latest'")
      kwargs['restore_checkpoint_cfg'] = restore
  trainer_cls = t5x.pop('trainer_cls', UNSET)
  if trainer_cls is not UNSET and trainer_cls is not None:
    if not _is(trainer_cls, trainer.Trainer):
      raise UserError(f'train.trainer_cls = {trainer_cls!r} is not supported by t5train; use '
                      '@trainer.Trainer (its learning_rate_fn and num_microbatches are used)')
    settings = _bindings(trainer_cls)
    for name in ('learning_rate_fn', 'num_microbatches'):
      if name in settings:
        if kwargs.get(name) is not None:
          raise UserError(f'train.{name} and trainer.Trainer.{name} are both bound; bind one')
        kwargs[name] = (settings[name] or None) if name == 'num_microbatches' else settings[name]
  stats_period = t5x.pop('stats_period', UNSET)
  if stats_period not in (UNSET, None):
    kwargs['summary_period'] = stats_period
  relative_steps = t5x.pop('relative_steps', UNSET)
  if relative_steps not in (UNSET, None):
    start = _start_step(kwargs['model_dir'], kwargs.get('restore_checkpoint_cfg'))
    logging.info('relative_steps = %d: training to step %d + %d.', relative_steps, start,
                 relative_steps)
    kwargs['total_steps'] = start + relative_steps
  evaluator_cls = t5x.pop('inference_evaluator_cls', UNSET)
  if evaluator_cls not in (UNSET, None):
    num_examples = _evaluator_num_examples(evaluator_cls, program)
    if num_examples is not UNSET and kwargs.get('infer_eval_num_examples') is None:
      kwargs['infer_eval_num_examples'] = num_examples
  actions = t5x.pop('actions', UNSET)
  for stage_actions in (actions if actions not in (UNSET, None) else {}).values():
    for action in stage_actions:
      if not isinstance(action, trainer.TerminateOnNanAction):
        raise UserError(f'train.actions: {action!r} is not supported by t5train (it stops on a '
                        'non-finite loss itself; for early stopping see best_checkpoint_cfg)')
  if t5x.get('run_eval_before_training', UNSET) is not UNSET:
    require('train.run_eval_before_training', t5x.pop('run_eval_before_training'), False,
            'evaluations run every eval_period steps and at the last step')
  # No effect on what is trained: which PRNG draws the dropout masks (JAX's default here), when
  # T5X fetches metrics, when Python collects garbage.
  for name in ('use_hardware_rng', 'concurrent_metrics', 'gc_period'):
    t5x.pop(name, None)
  _check_common(program, t5x)
  return kwargs


def _translate_infer(kwargs: dict[str, Any], t5x: dict[str, Any]) -> dict[str, Any]:
  program = 'infer'
  for name, default, why in (
      ('merge_chunked_results', True, 'each task is written as one file'),
      ('output_vocab_feature_name', 'targets', 'outputs are decoded with the model vocabulary'),
      ('file_extension', 'jsonl', 'outputs are JSONL files'),
      ('keep_aux_as_numpy', False, 'outputs are JSON values')):
    if t5x.get(name, UNSET) is not UNSET:
      require(f'{program}.{name}', t5x.pop(name), default, why)
  for name in ('write_fn', 'merge_fn'):
    if t5x.get(name, UNSET) not in (UNSET, None):
      raise UserError(f'{program}.{name} is not supported by t5train (it writes JSONL itself)')
    t5x.pop(name, None)
  # No effect here: each task's file is written whole once decoded, and a rerun skips the
  # tasks already written (checkpoint_period, checkpoint_ds_iter).
  t5x.pop('checkpoint_period', None)
  t5x.pop('checkpoint_ds_iter', None)
  _check_common(program, t5x)
  return kwargs


def _translate_evaluate(kwargs: dict[str, Any], t5x: dict[str, Any]) -> dict[str, Any]:
  program = 'evaluate'
  evaluator_cls = t5x.pop('inference_evaluator_cls', UNSET)
  if evaluator_cls not in (UNSET, None):
    num_examples = _evaluator_num_examples(evaluator_cls, program)
    if num_examples is not UNSET and kwargs.get('num_examples') is None:
      kwargs['num_examples'] = num_examples
  if t5x.get('training_evaluator_cls', UNSET) is not UNSET:
    require(f'{program}.training_evaluator_cls', t5x.pop('training_evaluator_cls'), None,
            'eval runs the inference metrics of the task')
  _check_common(program, t5x)
  return kwargs


_TRANSLATORS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    'train': _translate_train, 'infer': _translate_infer, 'evaluate': _translate_evaluate}


def accepts_t5x_arguments(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` (t5train's ``train``, ``infer`` or ``evaluate``) taking T5X's arguments too."""
  signature = inspect.signature(fn)
  own = set(signature.parameters)
  extra = tuple(name for name in T5X_ARGUMENTS[fn.__name__] if name not in own)
  translate = _TRANSLATORS[fn.__name__]

  @functools.wraps(fn)
  def wrapper(**kwargs: Any) -> Any:
    t5x = {name: kwargs.pop(name) for name in extra if name in kwargs}
    t5x = {name: value for name, value in t5x.items() if value is not UNSET}
    if t5x or _has_t5x_values(kwargs):
      kwargs = translate(kwargs, t5x)
    return wrapper.t5train_function(**kwargs)

  parameters = list(signature.parameters.values())
  parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=UNSET)
                 for name in extra]
  wrapper.__signature__ = signature.replace(parameters=parameters)
  # Gin checks bindings against the signature of the innermost ``__wrapped__`` function; the
  # wrapper's own signature, with T5X's arguments, is the one to check against.
  del wrapper.__wrapped__
  wrapper.t5train_function = fn
  wrapper.t5x_arguments = extra
  return wrapper


def _has_t5x_values(kwargs: Mapping[str, Any]) -> bool:
  from t5train.t5x_compat import utils  # pylint: disable=g-import-not-at-top
  return isinstance(kwargs.get('checkpoint_cfg'), utils.CheckpointConfig)
