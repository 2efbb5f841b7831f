"""``InteractiveModel``: train, decode, score and evaluate a model on a few examples from Python.

The notebook-facing facade of T5X's ``interactive_model`` module, with its
names and signatures. It owns no training or decoding code of its own: steps
go through ``trainer.Trainer``, decoding and scoring through
``inference.InferenceRunner``, checkpoints through ``checkpoints``, exactly as
in the binaries. ``get_gin_config_from_interactive_model`` turns the same set-up
into a gin file for ``python -m t5train.train`` / ``infer`` / ``eval``.

Examples are natural text: a string (an input without a target) or a dict with
``input`` and ``target``; the default preprocessing tokenizes them and appends EOS.
"""

from __future__ import annotations

import atexit
import enum
import inspect
import itertools
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from t5train import (
  assembly,
  checkpoint_reading,
  checkpoints,
  data,
  inference,
  models,
  multihost,
  optimizers,
  partitioning,
  paths,
  t5x_compat,
  text_metrics,
)
from t5train import trainer as trainer_lib
from t5train.errors import UserError
from t5train.train_state import TrainState

# Notebooks parse gin that says ``from t5x import ...`` before building an InteractiveModel:
# T5X's names come from t5train.t5x_compat unless the real t5x is installed.
t5x_compat.install_t5x_names()

Example = str | bytes | Mapping[str, Any]
Preprocessor = Callable[..., tf.data.Dataset]
MetricFn = Callable[..., Mapping[str, Any]]
BatchesType = Sequence[Example] | Sequence[Sequence[Example]]
DEFAULT_PREPROCESSORS = (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos)


class InferenceType(enum.Enum):
  PREDICT_WITH_AUX = 1
  SCORE = 2


class ScriptType(enum.Enum):
  """Which binary a config from ``get_gin_config_from_interactive_model`` is for."""
  FINETUNING = 1
  INFERENCE = 2
  EVALUATION = 3
  PRETRAINING = 4


T5XScriptType = ScriptType  # T5X's name


def _example_dict(example: Example) -> dict[str, Any]:
  """``{'input': ..., 'target': ...}``; a bare input gets an empty target."""
  if isinstance(example, Mapping):
    if 'input' not in example:
      raise ValueError(f"an example dict needs an 'input' key (and usually 'target'): {example!r}")
    return {'input': example['input'], 'target': example.get('target', '')}
  return {'input': example, 'target': ''}


def _tensor_spec(values: Sequence[Any]) -> tf.TensorSpec:
  """A string scalar for text, an int32 vector for token ids."""
  if all(isinstance(v, (str, bytes)) for v in values):
    return tf.TensorSpec([], tf.string)
  return tf.TensorSpec([None], tf.int32)


def get_dataset_from_natural_text_examples(
    examples: Sequence[Example], preprocessors: Sequence[Preprocessor],
    task_feature_lengths: Mapping[str, int] | None,
    features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """The examples as a tf.data.Dataset (``inputs``, ``targets``, ``answers``), preprocessed,
  checked against ``features`` and trimmed to ``task_feature_lengths``.

  Examples may also hold token ids instead of text (``get_batches_from_seqio`` with
  ``get_pretokenized_examples=False``); run them with no preprocessors.
  """
  rows = [_example_dict(example) for example in examples]
  if not rows:
    raise ValueError('no examples were given')
  inputs, targets = [row['input'] for row in rows], [row['target'] for row in rows]
  target_spec = _tensor_spec(targets)
  signature = {'inputs': _tensor_spec(inputs), 'targets': target_spec,
               'answers': tf.TensorSpec([1, *target_spec.shape], target_spec.dtype)}

  def generate() -> Iterator[dict[str, Any]]:
    for source, target in zip(inputs, targets):
      yield {'inputs': source, 'targets': target, 'answers': [target]}

  dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
  for preprocessor in preprocessors:
    parameters = inspect.signature(preprocessor).parameters
    kwargs = {}
    if 'sequence_length' in parameters:
      kwargs['sequence_length'] = task_feature_lengths
    if 'output_features' in parameters:
      kwargs['output_features'] = features
    dataset = preprocessor(dataset, **kwargs)
  _check_features(dataset, features)
  return seqio.utils.trim_dataset(dataset, task_feature_lengths, features)


def _check_features(dataset: tf.data.Dataset, features: Mapping[str, seqio.Feature]) -> None:
  """A ValueError naming the feature that preprocessing left missing or of the wrong type."""
  specs = dataset.element_spec
  for name, feature in features.items():
    if name not in specs:
      if feature.required:
        raise ValueError(f'the examples lack feature {name!r} after preprocessing; are the '
                         'preprocessors (tokenize, append_eos) missing?')
      continue
    if specs[name].dtype != feature.dtype or specs[name].shape.rank != feature.rank:
      raise ValueError(f'feature {name!r} is {specs[name].dtype.name} of rank '
                       f'{specs[name].shape.rank} after preprocessing; the model needs '
                       f'{feature.dtype.name} of rank {feature.rank}')


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class InteractiveModel:
  """A model, its train state and a trainer, driven one batch of examples at a time.

  ``__init__`` restores the newest checkpoint in ``output_dir`` if there is one,
  else ``checkpoint_path`` (by ``restore_mode``), else initialises from
  ``init_random_seed``. As in T5X, every training step saves a checkpoint to
  ``output_dir`` (in the background; the newest 5 are kept); ``checkpoint_period``
  saves every Nth step instead, 0 never (``save_checkpoint()`` always saves).
  """

  def __init__(self, batch_size: int, task_feature_lengths: Mapping[str, int], output_dir: str,
               partitioner: partitioning.PjitPartitioner, model: models.BaseTransformerModel,
               dtype: str = 'float32', restore_mode: str = 'specific',
               checkpoint_path: str | None = '',
               input_shapes: Mapping[str, Sequence[int]] | None = None,
               input_types: Mapping[str, Any] | None = None, init_random_seed: int = 42,
               add_eos: bool = True, eval_names: Sequence[str] | None = None,
               checkpoint_period: int = 1):
    if checkpoint_period < 0:
      raise ValueError(f'checkpoint_period must be >= 0, not {checkpoint_period}')
    self._checkpoint_period = checkpoint_period
    self._batch_size = batch_size
    self._task_feature_lengths = dict(task_feature_lengths)
    self._output_dir = re.sub(r'(?<!:)/{2,}', '/', output_dir)  # gs:// keeps its two
    paths.resolve(self._output_dir).mkdir(parents=True, exist_ok=True)
    self._partitioner = partitioner
    self._model = model
    self._init_random_seed = init_random_seed
    self._check_partitions()
    self._layout = partitioner.get_data_layout(batch_size)  # a UserError if it does not split

    seed = int(multihost_utils.broadcast_one_to_all(np.int32(init_random_seed)))
    self._feature_converter = model.FEATURE_CONVERTER_CLS(pack=False)
    self._features = {
        'inputs': seqio.Feature(vocabulary=model.input_vocabulary, add_eos=add_eos),
        'targets': seqio.Feature(vocabulary=model.output_vocabulary, add_eos=add_eos)}

    self._restore_checkpoint_cfg = (
        checkpoints.RestoreCheckpointConfig(path=checkpoint_path, mode=restore_mode, dtype=dtype)
        if checkpoint_path else None)
    self._save_checkpoint_cfg = checkpoints.SaveCheckpointConfig(
        period=1000, keep=5, dtype=dtype, save_dataset=False)
    if input_shapes is None:
      input_shapes = model.input_shapes(batch_size, self._task_feature_lengths)
    self._parts = assembly.assemble_training(
        model, partitioner, input_shapes, model_dir=self._output_dir,
        save_cfg=self._save_checkpoint_cfg, restore_cfg=self._restore_checkpoint_cfg,
        random_seed=seed, input_types=input_types)
    self._checkpoint_manager = self._parts.checkpoint_manager
    self._trainer = self._parts.trainer
    del eval_names  # evaluation runs through evaluate(), not the trainer
    self._train_summary: trainer_lib.TrainSummary | None = None
    self._runners: dict[tuple, inference.InferenceRunner] = {}
    self._last_batch: tuple[Any, dict[str, jax.Array]] | None = None
    self._closed = False
    _close_at_exit(self)

  def _check_partitions(self) -> None:
    """The notebook's check: the devices must split evenly into model partitions."""
    num_partitions = self._partitioner.num_model_partitions
    if jax.device_count() % num_partitions:
      raise ValueError(f'There are {jax.device_count()} devices, which do not split into '
                       f'{num_partitions} partitions; choose a number of partitions that '
                       'divides the device count.')

  @property
  def trainer(self) -> trainer_lib.Trainer:
    return self._trainer

  @property
  def partitioner(self) -> partitioning.PjitPartitioner:
    return self._partitioner

  @property
  def model(self) -> models.BaseTransformerModel:
    return self._model

  @property
  def train_state(self) -> TrainState:
    return self._trainer.train_state

  @property
  def train_state_axes(self) -> TrainState:
    return self._parts.initializer.train_state_axes

  @property
  def train_summary(self) -> dict[str, float]:
    """The metrics of the last training step (``loss``, ``accuracy``, ...)."""
    if self._train_summary is None:
      raise ValueError('no training step has run yet')
    return self._train_summary.result()

  @property
  def step(self) -> int:
    return int(multihost.get_local_data(self._trainer.train_state.step))

  # Training.

  def train_step(self, examples: Sequence[Example]) -> None:
    """One step on one batch of natural-text examples, then a checkpoint."""
    self.train_step_with_preprocessors(examples, DEFAULT_PREPROCESSORS)

  def train_step_with_preprocessors(self, examples: Sequence[Example],
                                    preprocessors: Sequence[Preprocessor]) -> None:
    """One step on the first ``batch_size`` examples after ``preprocessors``, then a checkpoint
    (every ``checkpoint_period`` steps).

    The batch of the last call is kept, so training again on the same examples
    does not run the preprocessing again.
    """
    if len(examples) < self._batch_size:
      raise ValueError(f'At least one batch of data must be provided: got {len(examples)} '
                       f'examples for batch_size {self._batch_size}. Decrease the batch_size '
                       'or provide more examples.')
    examples = examples[:self._batch_size]
    key = (repr([_example_dict(example) for example in examples]), tuple(preprocessors))
    if self._last_batch is None or self._last_batch[0] != key:
      dataset = get_dataset_from_natural_text_examples(
          examples, preprocessors, self._task_feature_lengths, self._features)
      dataset = self._feature_converter(dataset, task_feature_lengths=self._task_feature_lengths)
      self._last_batch = (key, next(self._host_batches(dataset)))
    self.train_step_from_batch_iterator(iter([self._last_batch[1]]))

  def _host_batches(self, dataset: tf.data.Dataset) -> data.BatchIterator:
    """Global batches of which this process supplies the rows of its own devices."""
    start = self._layout.shard_id * self._layout.per_host_batch_size
    rows = slice(start, start + self._layout.per_host_batch_size)
    dataset = dataset.batch(self._batch_size, drop_remainder=True)
    dataset = dataset.map(lambda batch: {name: value[rows] for name, value in batch.items()})
    sharding = self._partitioner.sharding(self._partitioner.data_partition_spec)
    return data.BatchIterator(dataset, sharding, self._batch_size)

  def train_step_from_batch_iterator(self, iterator: Iterator[Mapping[str, Any]]) -> None:
    """One step on the next batch of ``iterator`` (model features), then a checkpoint
    (every ``checkpoint_period`` steps).

    With ``trainer.stop_training`` set it does nothing, as in T5X; a PreemptionError from
    the trainer is raised after an emergency checkpoint.
    """
    if self._trainer.stop_training:
      logging.info('Not training: stop_training is set.')
      return
    try:
      self._train_summary = self._trainer.train(iterator, 1, start_step=self.step)
    except trainer_lib.PreemptionError:
      logging.info('Saving an emergency checkpoint.')
      self.save_checkpoint()
      raise
    if self._checkpoint_period and self.step % self._checkpoint_period == 0:
      self._checkpoint_manager.save(self._trainer.train_state, force=True)

  def save_checkpoint(self) -> None:
    """Writes the current state to ``output_dir/checkpoint_<step>`` and waits for it."""
    self._checkpoint_manager.save(self._trainer.train_state, force=True)
    self._checkpoint_manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the checkpoint saves still in flight, then closes the checkpoint manager.

    ``train_step`` saves in the background; a script ending right after it would
    otherwise lose that checkpoint. It runs by itself when the interpreter exits
    (before Python stops the threads that write checkpoints); calling it again does
    nothing. The model saves no checkpoints after it.
    """
    if self._closed:
      return
    self._closed = True
    try:
      self._checkpoint_manager.wait_until_finished()
    finally:
      self._checkpoint_manager.close()

  def train_loop(self, num_steps: int, eval_period: int = 1,
                 train_batches: BatchesType | None = None,
                 predict_batches: Sequence[Sequence[Example]] | None = None,
                 score_batches: Sequence[Sequence[Example]] | None = None,
                 eval_batches: Sequence[Sequence[Example]] | None = None,
                 metrics_fns: Sequence[MetricFn] | None = None
                 ) -> tuple[Any, Any, Mapping[str, Any] | None]:
    """``num_steps`` training steps over ``train_batches`` (one batch is repeated, a list is
    cycled), predicting, scoring and evaluating the other batches every ``eval_period`` steps.

    Returns the predictions, scores and metrics of the last evaluation.
    """
    predictions = scores = metrics = None
    for step, batch in enumerate(_repeat_batches(train_batches, num_steps)):
      if batch is not None:
        self.train_step(batch)
      if eval_period and step % eval_period == 0:
        for predict_batch in predict_batches or ():
          predictions, _ = self.predict_with_aux(predict_batch)
        for score_batch in score_batches or ():
          scores = self.score(score_batch)
        for eval_batch in eval_batches or ():
          metrics = self.evaluate(eval_batch, metrics_fns or ())
    self._checkpoint_manager.wait_until_finished()
    return predictions, scores, metrics

  # Inference.

  def _runner(self, inference_kwargs: Mapping[str, Any]) -> inference.InferenceRunner:
    """The compiled predict and score functions, one set per distinct ``inference_kwargs``."""
    key = tuple(sorted(inference_kwargs.items()))
    if key not in self._runners:
      self._runners[key] = inference.InferenceRunner(
          self._model, self._partitioner, self._parts.initializer.train_state_shardings.params,
          self._batch_size, self._task_feature_lengths['targets'], decoder_params=inference_kwargs)
    return self._runners[key]

  def infer_with_preprocessors(self, mode: InferenceType, examples: Sequence[Example],
                               preprocessors: Sequence[Preprocessor], **inference_kwargs: Any
                               ) -> tuple[list[tuple[dict[str, Any], Any]], dict[str, list]]:
    """Decodes (PREDICT_WITH_AUX) or scores (SCORE) every example.

    Returns ``[(example features, prediction bytes or score), ...]`` and the
    auxiliary values (``{'scores': [...]}`` for predictions). ``inference_kwargs``
    go to the decoding function (e.g. ``temperature``).
    """
    if mode not in (InferenceType.PREDICT_WITH_AUX, InferenceType.SCORE):
      raise ValueError(f'mode must be InferenceType.PREDICT_WITH_AUX or SCORE, not {mode!r}')
    dataset = get_dataset_from_natural_text_examples(
        examples, preprocessors, self._task_feature_lengths, self._features)
    task_examples = list(dataset.as_numpy_iterator())
    features = [self._model.example_features(ex, self._task_feature_lengths) for ex in task_examples]
    runner = self._runner(inference_kwargs)
    params = self._trainer.train_state.params
    if mode == InferenceType.SCORE:
      return list(zip(task_examples, runner.score(params, features))), {}
    tokens, scores = runner.predict(params, features)
    decoded = [self._model.output_vocabulary.decode(row.tolist()).encode('utf-8')
               for row in tokens]
    return list(zip(task_examples, decoded)), {'scores': scores}

  def predict_with_aux(self, examples: Sequence[Example]
                       ) -> tuple[list[tuple[dict[str, Any], bytes]], dict[str, list]]:
    """The decoded prediction of each example, with its score in the auxiliary values."""
    return self.infer_with_preprocessors(InferenceType.PREDICT_WITH_AUX, examples,
                                         DEFAULT_PREPROCESSORS)

  def score(self, examples: Sequence[Example]) -> list[tuple[dict[str, Any], float]]:
    """The log-likelihood of each example's target (the infer binary's score mode)."""
    scores, _ = self.infer_with_preprocessors(InferenceType.SCORE, examples, DEFAULT_PREPROCESSORS)
    return scores

  # Evaluation.

  def evaluate(self, examples: Sequence[Example], metric_fns: Sequence[MetricFn | str]
               ) -> dict[str, Any]:
    """Metrics of the examples' predictions and scores against their targets; a metric is a
    function or a name of ``text_metrics.METRICS`` ('bleu', 'rouge', ...)."""
    return self.evaluate_with_preprocessors(examples, DEFAULT_PREPROCESSORS, metric_fns)

  def evaluate_with_preprocessors(self, examples: Sequence[Example],
                                  preprocessors: Sequence[Preprocessor],
                                  metric_fns: Sequence[MetricFn | str],
                                  postprocessor: Callable[..., Any] | None = None
                                  ) -> dict[str, Any]:
    """Runs each metric function with the arguments its signature names, as seqio does:
    ``(targets, predictions)``, ``(targets, predictions, aux_values)`` or ``(targets, scores)``.
    Targets and predictions are text, after ``postprocessor`` when given.
    """
    metric_fns = [text_metrics.metric_fns([fn])[0] if isinstance(fn, str) else fn
                  for fn in metric_fns]
    kinds = {fn: _metric_kind(fn) for fn in metric_fns}
    dataset = get_dataset_from_natural_text_examples(
        examples, preprocessors, self._task_feature_lengths, self._features)

    def postprocess(value: Any, **kwargs: Any) -> Any:
      return postprocessor(value, **kwargs) if postprocessor else value

    targets = [postprocess(_text(ex['targets_pretokenized']), example=ex, is_target=True)
               for ex in dataset.as_numpy_iterator()]
    predictions: list[Any] = []
    aux_values: dict[str, list] = {}
    scores: list[float] = []
    if {'predict', 'predict_with_aux'} & set(kinds.values()):
      predicted, aux_values = self.infer_with_preprocessors(
          InferenceType.PREDICT_WITH_AUX, examples, preprocessors)
      predictions = [postprocess(_text(prediction), example=ex, is_target=False)
                     for ex, prediction in predicted]
    if 'score' in kinds.values():
      scored, _ = self.infer_with_preprocessors(InferenceType.SCORE, examples, preprocessors)
      scores = [score for _, score in scored]
    arguments = {'predict': (targets, predictions),
                 'predict_with_aux': (targets, predictions, aux_values),
                 'score': (targets, scores)}
    results: dict[str, Any] = {}
    for name, value in itertools.chain.from_iterable(
        fn(*arguments[kind]).items() for fn, kind in kinds.items()):
      if name in results:
        raise ValueError(f'two metric functions return {name!r}')
      results[name] = value
    return results


def _close_at_exit(model: InteractiveModel) -> None:
  """Has ``model.close()`` run at interpreter exit, while it is alive.

  Orbax writes in threads of ``concurrent.futures`` executors, which take no new
  work once Python's threading shutdown has run their exit hooks; ``atexit``
  functions run only after that. So the close is registered as a threading exit
  hook, which runs before the executors' (registered earlier, run in reverse
  order); ``atexit`` is the fallback where Python lacks that hook.
  """
  ref = weakref.ref(model)

  def close() -> None:
    alive = ref()
    if alive is None:
      return
    try:
      alive.close()
    except Exception as e:  # pylint: disable=broad-except  (reported; exit goes on)
      print(f'InteractiveModel: the last checkpoint could not be finished at exit: {e}',
            file=sys.stderr)

  register = getattr(threading, '_register_atexit', None)
  try:
    if register is None:
      raise RuntimeError('no threading exit hooks')
    register(close)
  except RuntimeError:  # none, or already shutting down
    atexit.register(close)


def _metric_kind(fn: MetricFn) -> str:
  """'predict', 'predict_with_aux' or 'score', from the metric function's required arguments."""
  required = tuple(name for name, parameter in inspect.signature(fn).parameters.items()
                   if parameter.default is inspect.Parameter.empty)
  kinds = {('targets', 'predictions'): 'predict',
           ('targets', 'predictions', 'aux_values'): 'predict_with_aux',
           ('targets', 'scores'): 'score'}
  if required not in kinds:
    raise ValueError(f'metric function {getattr(fn, "__name__", fn)} takes {required}; it must '
                     "take ('targets', 'predictions'), ('targets', 'predictions', 'aux_values') "
                     "or ('targets', 'scores')")
  return kinds[required]


def _repeat_batches(batches: BatchesType | None, length: int) -> list[Any]:
  """``length`` batches: None (no training), one batch repeated, or a list cycled or cut."""
  if not batches:
    return [None] * length
  if not isinstance(batches[0], Sequence) or isinstance(batches[0], (str, bytes)):
    return [batches] * length  # a single batch of examples
  return list(itertools.islice(itertools.cycle(batches), length))


def get_batches_from_seqio(task_or_mixture_name: str, split: str, batch_size: int,
                           num_batches: int, get_pretokenized_examples: bool = True,
                           sequence_length: Mapping[str, int] | None = None,
                           **get_dataset_kwargs: Any) -> list[list[dict[str, Any]]]:
  """``num_batches`` batches of ``{'input': ..., 'target': ...}`` examples from a seqio task.

  With ``get_pretokenized_examples`` the examples are the task's text (for
  ``train_step`` and friends); without, its token ids after all preprocessing
  (for ``train_step_with_preprocessors(batch, [])``).
  """
  task = data.get_mixture_or_task(task_or_mixture_name)
  wanted = batch_size * num_batches
  dataset = task.get_dataset(sequence_length=sequence_length, split=split, **get_dataset_kwargs)
  suffix = '_pretokenized' if get_pretokenized_examples else ''
  examples = []
  for element in dataset.take(wanted).as_numpy_iterator():
    source, target = element[f'inputs{suffix}'], element[f'targets{suffix}']
    if not get_pretokenized_examples:
      source, target = source.tolist(), target.tolist()
    examples.append({'input': source, 'target': target})
  if len(examples) < wanted:
    raise ValueError(f'{task_or_mixture_name!r} ({split}) has {len(examples)} examples, fewer '
                     f'than the {num_batches} batches of {batch_size} asked for')
  return [examples[i:i + batch_size] for i in range(0, wanted, batch_size)]


def _scheduler_bindings() -> str:
  """The learning-rate schedule InteractiveModel trains with, as gin bindings."""
  defaults = inspect.signature(optimizers.create_learning_rate_scheduler).parameters
  lines = [f'  {name} = {parameter.default!r}' for name, parameter in defaults.items()]
  return 'optimizers.create_learning_rate_scheduler:\n' + '\n'.join(lines)


def _checkpoint_to_use(interactive_model: InteractiveModel) -> str:
  """The checkpoint the binaries should start from: the newest one the InteractiveModel saved,
  else the one it was loaded from."""
  try:
    return checkpoint_reading.find_checkpoints(interactive_model._output_dir)[-1][1]  # pylint: disable=protected-access
  except UserError:
    pass  # it saved none
  restore = interactive_model._restore_checkpoint_cfg  # pylint: disable=protected-access
  if restore is None:
    raise ValueError('the InteractiveModel has no checkpoint for the binaries to start from: '
                     'call save_checkpoint() first or give it a checkpoint_path')
  return checkpoints.select_checkpoints(restore)[-1][1]


def get_gin_config_from_interactive_model(interactive_model: InteractiveModel,
                                          script_type: ScriptType, task_name: str,
                                          partitioner_config_str: str, model_config_str: str,
                                          train_steps: int = 1, imports_str: str = '') -> str:
  """A gin file that runs the InteractiveModel's set-up through a t5train binary.

  ``imports_str`` must define the model (e.g. ``include 'models/t5_1_1/tiny.gin'``)
  and register ``task_name`` if it is not built in; ``model_config_str`` and
  ``partitioner_config_str`` are gin bindings added as they are. Training configs
  train unshuffled and unpacked with the InteractiveModel's seed, schedule and
  checkpoint policy, in its output directory.
  """
  im = interactive_model
  model_dir = im._output_dir  # pylint: disable=protected-access
  save = im._save_checkpoint_cfg  # pylint: disable=protected-access
  common = f"""MODEL_DIR = {model_dir!r}
MIXTURE_OR_TASK_NAME = {task_name!r}
TASK_FEATURE_LENGTHS = {im._task_feature_lengths!r}
BATCH_SIZE = {im._batch_size}
USE_CACHED_TASKS = False

{model_config_str}
{partitioner_config_str}
"""
  header = f"""from __gin__ import dynamic_registration
from t5train import checkpoints
from t5train import data
from t5train import models
from t5train import optimizers
from t5train import partitioning
{imports_str}
"""
  if script_type in (ScriptType.PRETRAINING, ScriptType.FINETUNING):
    restore = ''
    run_file = 'runs/pretrain.gin'
    if script_type == ScriptType.FINETUNING:
      run_file = 'runs/finetune.gin'
      restore = f'INITIAL_CHECKPOINT_PATH = {_checkpoint_to_use(im)!r}\n'
    return f"""{header}include '{run_file}'

{common}{restore}TRAIN_STEPS = {train_steps}
RANDOM_SEED = {im._init_random_seed}
DROPOUT_RATE = 0.0
CHECKPOINT_PERIOD = {save.period}
checkpoints.SaveCheckpointConfig:
  keep = {save.keep}
  dtype = {save.dtype!r}
  save_dataset = {save.save_dataset}
train/data.DatasetConfig:
  shuffle = False
  pack = False
train_eval/data.DatasetConfig.pack = False
{_scheduler_bindings()}
"""
  checkpoint = _checkpoint_to_use(im)
  if script_type == ScriptType.INFERENCE:
    return f"""{header}include 'runs/infer.gin'

{common}CHECKPOINT_PATH = {checkpoint!r}
INFER_OUTPUT_DIR = {os.path.join(model_dir, 'inference')!r}
"""
  if script_type == ScriptType.EVALUATION:
    return f"""{header}include 'runs/eval.gin'

{common}CHECKPOINT_PATH = {checkpoint!r}
RESTORE_MODE = 'latest'
EVAL_OUTPUT_DIR = {os.path.join(model_dir, 'eval')!r}
"""
  raise ValueError(f'unknown script_type {script_type!r}')
