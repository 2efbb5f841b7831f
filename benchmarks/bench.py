"""``python -m benchmarks.bench`` (``make bench``): training and decoding speed, side by side with a peer.

Each row runs in its own process (so that peak memory is that row's alone) on
random tokens, with no TensorFlow or seqio, so it also runs on accelerator
images without them. Model sizes are read from gin/models/t5_1_1/. Rows:
t5train at each size, built by the train binary's assembly; t5train trained
through the seed notebook's Python API (``utils.TrainStateInitializer``,
``utils.LegacyCheckpointManager``, ``trainer.Trainer.train`` one step at a
time, TensorBoard summaries on); and, where PyTorch and transformers are
installed, transformers' T5 in eager PyTorch on the same shapes. Training:
model FLOPs are counted analytically (see ``train_flops_per_step``) and divided
by a matrix-multiply rate measured in the same run on the same device; each
t5train row also runs the train binary's loop and reports where its time goes
(waiting for data, computing, checkpointing).
Flags choose the model options of the t5train rows (scanned layers,
rematerialisation, attention kernel). Decoding: generated tokens per second for greedy
and 4-beam search, always to the full length (EOS is never emitted).
Checkpoints: save and restore seconds and MB/s of the train state, and the step
time while an asynchronous save is in flight.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import model_sizes

_SIZES = flags.DEFINE_list('sizes', ['tiny', 'small'], 'Model sizes to measure.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_LENGTHS = flags.DEFINE_list('lengths', ['128', '32'], 'Input and target lengths.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Warm steps to time (after 2 untimed ones).')
_NOTEBOOK_ROWS = flags.DEFINE_boolean('notebook_rows', True, 'Also train through the seed '
                                      'notebook\'s Python API (a row per round).')
_TRAIN_ROUNDS = flags.DEFINE_integer('train_rounds', 2, 'Training rows per size and system; '
                                     't5train and the peer take turns (A B A B).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Activation dtype: float32 or bfloat16.')
_PEER = flags.DEFINE_enum('peer', 'auto', ['auto', 'none', 'transformers'],
                          'Also measure transformers\' PyTorch T5 (auto: if installed).')
_OUT = flags.DEFINE_string('out', 'docs/bench/cpu.json', 'Where to write the JSON results.')
_WORKLOADS = flags.DEFINE_list('workloads', ['train', 'decoder_only', 'finetune', 'decode',
                                               'checkpoint'],
                               'Any of train, decode, checkpoint.')
_CHECKPOINT_SIZES = flags.DEFINE_list('checkpoint_sizes', ['small', 'base'],
                                      'Model sizes for the checkpoint rows.')
_DECODE_SIZES = flags.DEFINE_list('decode_sizes', ['small'], 'Model sizes for decoding.')
_FINETUNE_SIZES = flags.DEFINE_list('finetune_sizes', ['base'],
                                     'T5 1.1 sizes for the fine-tuning workload.')
_FINETUNE_METHODS = flags.DEFINE_list(
    'finetune_methods', ['full_adafactor', 'full_adamw', 'lora', 'prompt'],
    'Fine-tuning rows: full fine-tuning with Adafactor or AdamW, LoRA rank 8 on query and '
    'value (beside PEFT on transformers), prompt tuning with 100 prompts.')
_DECODER_ONLY_SIZES = flags.DEFINE_list(
    'decoder_only_sizes', ['small'],
    'gin/models/decoder_only sizes for the decoder-only workload (prefix LM on inputs + '
    'targets, beside transformers\' Mistral of the same dimensions).')
_DECODE_BATCHES = flags.DEFINE_list('decode_batch_sizes', ['1', '32', '128'],
                                    'Batch sizes for decoding (latency and throughput).')
_DECODE_METHODS = flags.DEFINE_list('decode_methods', ['greedy', 'beam4'],
                                    'greedy and/or beam<N>.')
_DECODE_DECODER_ONLY_SIZES = flags.DEFINE_list(
    'decode_decoder_only_sizes', ['small'], 'Decoder-only sizes (gin/models/decoder_only/) for '
    'decoding: prompts of the input length continued by the target length.')
_DECODE_COMPILED = flags.DEFINE_boolean(
    'decode_compiled_peer', True, "Decode rows: also transformers' generate with its static "
    'cache and torch.compile (compiling takes minutes per row on a CPU).')
_DECODE_REPEATS = flags.DEFINE_integer('decode_repeats', 3, 'Timed decodes per row (median).')
_SCAN_LAYERS = flags.DEFINE_boolean('scan_layers', False, 't5train rows: nn.scan over layers.')
_REMAT_POLICY = flags.DEFINE_enum('remat_policy', 'none', ['none', 'full', 'dots_saveable'],
                                  't5train rows: what the backward pass recomputes.')
_ATTENTION = flags.DEFINE_enum('attention_implementation', None, ['xla', 'cudnn'],
                               't5train rows: jax.nn.dot_product_attention with this '
                               'implementation instead of t5train\'s own attention.')
_LOOP_BREAKDOWN = flags.DEFINE_boolean('loop_breakdown', True, 't5train rows: also run the '
                                       'train binary\'s loop (with checkpoints) and report where '
                                       'its time goes.')
_ROW_TIMEOUT = flags.DEFINE_float('row_timeout', None, 'Seconds a row may take (its process is '
                                  'ended and the row reports the timeout); none by default.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: measure one row and print JSON.')
_METHOD = flags.DEFINE_string('method', 'greedy', 'Internal: the decoding method of a worker.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_flops_per_step(size: dict[str, Any], batch: int, input_length: int,
                         target_length: int) -> float:
  """Matmul and attention FLOPs of one training step (forward + backward = 3 x forward).

  ``size`` holds ``network.T5Config`` fields. Per encoder token and layer: Q, K, V, O
  (4 d x inner) and the MLP ((inputs + 1) d x mlp, two inputs when gated).
  Per decoder token and layer: self Q, K, V, O, cross Q, O (6 d x inner), the MLP, and the
  logits (d x vocab) once; cross K, V (2 d x inner) are per encoder token. Attention adds
  2 x 2 x q_len x k_len x inner per layer (scores and weighted sum). Embedding lookups,
  norms and softmax are left out. Not 6N per token: that would charge the decoder's
  parameters to encoder tokens and overstate an encoder-decoder's cost.
  """
  return 3.0 * _forward_flops(size, input_length, target_length) * batch


def _forward_flops(size: dict[str, Any], input_length: int, target_length: int,
                   decoder_rows: int = 1) -> float:
  """One example's forward FLOPs as ``train_flops_per_step`` counts them, with the decoder side
  run ``decoder_rows`` times (beams)."""
  d, inner, mlp = size['emb_dim'], size['num_heads'] * size['head_dim'], size['mlp_dim']
  num_mlp_inputs = len(size.get('mlp_activations', ('relu',)))  # gated MLPs have two
  enc_layers, dec_layers = size['num_encoder_layers'], size['num_decoder_layers']
  mlp_params = (num_mlp_inputs + 1) * d * mlp
  enc_token = enc_layers * (4 * d * inner + mlp_params) + dec_layers * 2 * d * inner
  dec_token = dec_layers * (6 * d * inner + mlp_params) + d * size['vocab_size']
  encoder = 2 * enc_token * input_length + enc_layers * 4 * input_length**2 * inner
  decoder = (2 * dec_token * target_length +
             dec_layers * 4 * (target_length**2 + target_length * input_length) * inner)
  return encoder + decoder_rows * decoder


def decode_flops(size: dict[str, Any], batch: int, input_length: int, target_length: int,
                 beams: int = 1) -> float:
  """Matmul and attention FLOPs of decoding ``target_length`` tokens for ``batch`` examples:
  the encoder once, the decoder once per beam (the forward pass of ``train_flops_per_step``)."""
  return _forward_flops(size, input_length, target_length, beams) * batch


def decode_weight_bytes(size: dict[str, Any], input_length: int, target_length: int,
                        bytes_per_param: int = 4) -> float:
  """Parameter bytes one decode of one example must read: the encoder and the cross K, V
  projections once, the rest of the decoder and the output layer at every step. At batch 1
  this traffic over the measured memory bandwidth is the decode's floor."""
  d, inner, mlp = size['emb_dim'], size['num_heads'] * size['head_dim'], size['mlp_dim']
  mlp_params = (len(size.get('mlp_activations', ('relu',))) + 1) * d * mlp
  once = (size['num_encoder_layers'] * (4 * d * inner + mlp_params)
          + size['num_decoder_layers'] * 2 * d * inner)
  per_step = size['num_decoder_layers'] * (6 * d * inner + mlp_params) + d * size['vocab_size']
  del input_length
  return float(bytes_per_param * (once + per_step * target_length))


def _memory_bandwidth() -> float:
  """Bytes/s of reading 512 MiB once (a sum; best of 5), as a decode step reads its weights."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((2**27,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    total(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return x.nbytes / min(times)


def decoder_only_train_flops_per_step(size: dict[str, Any], batch: int, length: int) -> float:
  """Matmul and attention FLOPs of one decoder-only training step on ``length``-token rows.

  Per token and layer: Q, K, V, O (4 d x inner) and the MLP; the logits (d x vocab) once per
  token; attention 2 x 2 x length**2 x inner per layer. Counted as ``train_flops_per_step``.
  """
  d, inner, mlp = size['emb_dim'], size['num_heads'] * size['head_dim'], size['mlp_dim']
  num_mlp_inputs = len(size.get('mlp_activations', ('relu',)))
  layers = size['num_decoder_layers']
  per_token = layers * (4 * d * inner + (num_mlp_inputs + 1) * d * mlp) + d * size['vocab_size']
  forward = 2 * per_token * length + layers * 4 * length**2 * inner
  return 3.0 * forward * batch


def decoder_only_decode_flops(size: dict[str, Any], batch: int, input_length: int,
                              target_length: int, beams: int) -> float:
  """Matmul FLOPs of decoding ``target_length`` tokens after an ``input_length``-token prompt
  with a cache: the layers over the prompt once, then the layers and the logits for each new
  token of each beam. Attention over the cache is left out (a few percent at these lengths)."""
  d, inner, mlp = size['emb_dim'], size['num_heads'] * size['head_dim'], size['mlp_dim']
  num_mlp_inputs = len(size.get('mlp_activations', ('relu',)))
  layers = size['num_decoder_layers'] * (4 * d * inner + (num_mlp_inputs + 1) * d * mlp)
  return 2.0 * batch * (layers * input_length + (layers + d * size['vocab_size']) * beams *
                        target_length)


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _peak_memory_gib() -> float:
  """The accelerator's peak bytes in use, or on CPU the process's peak RSS."""
  import jax
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  return stats['peak_bytes_in_use'] / 2**30 if stats else _peak_rss_gib()


# Datasheet dense (no sparsity) bfloat16 matrix rates, TFLOP/s, by the device names JAX and
# PyTorch report: the second MFU denominator of GPU rows (the first is measured in the row).
DATASHEET_BF16_TFLOPS = {'NVIDIA H200': 989.4, 'NVIDIA H100 80GB HBM3': 989.4,
                         'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA A100-SXM4-40GB': 312.0}


def _datasheet(row: dict[str, Any], device_name: str, dtype: str) -> dict[str, Any]:
  """The row's MFU against the device's datasheet bfloat16 rate, where the table knows it."""
  peak = DATASHEET_BF16_TFLOPS.get(device_name)
  if peak is None or dtype != 'bfloat16':
    return {}
  return {'device_name': device_name, 'peak_tflops_datasheet': peak,
          'mfu_datasheet': row['achieved_tflops'] / peak}


def _summarise(step_secs: list[float], first_step_secs: float, flops: float, tokens: int,
               peak_flops: float, peak_memory_gib: float) -> dict[str, Any]:
  median = statistics.median(step_secs)
  return {
      'sec_per_step_median': median,
      'sec_per_step_min': min(step_secs), 'sec_per_step_max': max(step_secs),
      'tokens_per_sec': tokens / median,
      'compile_and_first_step_secs': first_step_secs,
      'model_tflops_per_step': flops / 1e12,
      'achieved_tflops': flops / median / 1e12,
      'peak_tflops_measured': peak_flops / 1e12,
      'mfu': flops / median / peak_flops,
      'peak_memory_gib': peak_memory_gib,
  }


def _jax_matmul_flops(dtype: str) -> float:
  """FLOP/s of one square matmul of random ``dtype`` matrices, the best of several.

  On an accelerator the matrices are 8192 wide and 10 products are queued per timing, so that
  neither dispatch nor the host's clock shows in the rate (a single 4096-wide product, timed
  alone, measured 431 TFLOP/s on an H200 whose datasheet says 989).
  """
  import jax
  on_cpu = jax.default_backend() == 'cpu'
  n, queued = (2048, 1) if on_cpu else (8192, 10)
  a, b = (jax.random.normal(key, (n, n), dtype) for key in jax.random.split(jax.random.PRNGKey(0)))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready([matmul(a, b) for _ in range(queued)])
    times.append((time.perf_counter() - start) / queued)
  return 2 * n**3 / min(times)


def _t5_config(size_name: str, dtype: str, **model_options: Any) -> Any:
  """``network.T5Config`` of T5 1.1 ``size_name`` as its gin file sets it, without dropout."""
  from t5train import network
  return network.T5Config(**model_sizes.t5_1_1_size(size_name), dtype=dtype, dropout_rate=0.0,
                          **model_options)


def _t5train_model_and_batch(size_name: str, batch: int, input_length: int, target_length: int,
                             dtype: str, **model_options: Any) -> tuple[Any, dict[str, Any]]:
  """T5 1.1 of ``size_name`` with Adafactor (as in the gin files), and a batch of random tokens."""
  import numpy as np

  from t5train import models, network, optimizers
  config = _t5_config(size_name, dtype, **model_options)
  model = models.EncoderDecoderModel(network.Transformer(config), None, None,
                                     optimizers.Adafactor(), z_loss=1e-4)
  rng = np.random.default_rng(0)
  targets = rng.integers(2, config.vocab_size, (batch, target_length)).astype(np.int32)
  host_batch = {
      'encoder_input_tokens': rng.integers(2, config.vocab_size, (batch, input_length)
                                           ).astype(np.int32),
      'decoder_target_tokens': targets,
      'decoder_input_tokens': np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
      'decoder_loss_weights': np.ones_like(targets, np.float32),
  }
  return model, host_batch


def _device_batch(partitioner: Any, host_batch: dict[str, Any]) -> dict[str, Any]:
  import jax
  sharding = partitioner.sharding(partitioner.data_partition_spec)
  return {k: jax.device_put(v, sharding) for k, v in host_batch.items()}


def _t5train_setup(size_name: str, batch: int, input_length: int, target_length: int,
                   dtype: str, **model_options: Any) -> tuple[Any, Any, Any]:
  """(trainer, device batch, state initializer) built as the train binary builds them."""
  from t5train import assembly, optimizers, partitioning
  model, host_batch = _t5train_model_and_batch(size_name, batch, input_length, target_length,
                                               dtype, **model_options)
  partitioner = partitioning.PjitPartitioner()
  parts = assembly.assemble_training(
      model, partitioner, {name: value.shape for name, value in host_batch.items()},
      learning_rate_fn=optimizers.create_learning_rate_scheduler('constant', 1e-3))
  return parts.trainer, _device_batch(partitioner, host_batch), parts.initializer


def _loop_breakdown(t: Any, device_batch: Any, initializer: Any, steps: int) -> dict[str, float]:
  """Seconds per step that ``run_training`` spends waiting for data, computing and checkpointing.

  The loop is the train binary's, fed host batches through the same host-to-device
  path as ``data.BatchIterator`` (without tf.data), and saving an asynchronous
  checkpoint halfway and at the end.
  """
  import tempfile

  import jax

  from t5train import checkpoints, trainer
  host_batch = jax.device_get(device_batch)
  shardings = {name: x.sharding for name, x in device_batch.items()}

  def batches() -> Any:
    while True:
      yield {name: jax.make_array_from_process_local_data(shardings[name], x, x.shape)
             for name, x in host_batch.items()}

  first = int(jax.device_get(t.train_state.step))
  last = first + steps
  with tempfile.TemporaryDirectory() as directory:
    config = checkpoints.SaveCheckpointConfig(period=max(steps // 2, 1), save_dataset=False,
                                              use_async=True)
    manager = checkpoints.CheckpointManager(directory, config, initializer.train_state_shardings,
                                            initializer.global_train_state_shape)
    result = trainer.run_training(t, batches(), first, last, manager, summary_period=last,
                                  log_every_secs=float('inf'), log_fn=lambda _: None)
    manager.close()
  return {f'loop_{phase}_secs_per_step': result.summary[f'timing/{phase}_secs_per_step']
          for phase in ('data', 'compute', 'checkpoint')}


def _timed_step(t: Any, device_batch: Any) -> float:
  import jax
  start = time.perf_counter()
  jax.block_until_ready(t.train_step(device_batch))
  return time.perf_counter() - start


def _measure_t5train(size_name: str, batch: int, input_length: int, target_length: int,
                     steps: int, dtype: str, **model_options: Any) -> dict[str, Any]:
  import jax
  t, device_batch, initializer = _t5train_setup(size_name, batch, input_length, target_length,
                                                dtype, **model_options)
  first = _timed_step(t, device_batch)
  _timed_step(t, device_batch)
  step_secs = [_timed_step(t, device_batch) for _ in range(steps)]
  device = jax.devices()[0]
  memory = _peak_memory_gib()
  flops = train_flops_per_step(model_sizes.t5_1_1_size(size_name), batch, input_length,
                               target_length)
  row = _summarise(step_secs, first, flops, batch * (input_length + target_length),
                   _jax_matmul_flops(dtype), memory)
  row.update(_datasheet(row, str(device.device_kind), dtype))
  if _LOOP_BREAKDOWN.value:
    row.update(_loop_breakdown(t, device_batch, initializer, steps))
  row.update(model_options)
  row.update(system='t5train (JAX)', device=str(device.device_kind), jax_version=jax.__version__,
             batch_size=batch, xla_flags=os.environ.get('XLA_FLAGS', ''))
  return row


def _measure_t5train_notebook(size_name: str, batch: int, input_length: int, target_length: int,
                              steps: int, dtype: str, **model_options: Any) -> dict[str, Any]:
  """Training through the seed notebook's cells: ``utils.TrainStateInitializer``,
  ``utils.LegacyCheckpointManager`` (restoring nothing, so the state starts fresh),
  ``utils.log_model_info``, a ``Trainer`` with TensorBoard summaries, and
  ``Trainer.train`` one step per call. The notebook's checkpoint is saved after the timed steps
  and the peak memory, as its ``checkpoint_period`` would."""
  import tempfile

  import jax

  from t5train import partitioning, utils
  from t5train import trainer as trainer_lib
  model, host_batch = _t5train_model_and_batch(size_name, batch, input_length, target_length,
                                               dtype, **model_options)
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  input_shapes = {name: value.shape for name, value in host_batch.items()}
  init_rng, trainer_rng = jax.random.split(jax.random.PRNGKey(42))
  with tempfile.TemporaryDirectory() as output_dir:
    initializer = utils.TrainStateInitializer(
        optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
        input_shapes=input_shapes, input_types=None, partitioner=partitioner)
    save_cfg = utils.SaveCheckpointConfig(dtype='float32', keep=5, save_dataset=False)
    restore_cfg = utils.RestoreCheckpointConfig(dtype='float32', mode='specific', path=None)
    manager = utils.LegacyCheckpointManager(
        save_cfg=save_cfg, restore_cfg=restore_cfg,
        train_state_shape=initializer.global_train_state_shape, partitioner=partitioner,
        ds_iter=None, model_dir=output_dir)
    train_state = manager.restore(
        [restore_cfg.path], restore_cfg,
        utils.get_fallback_state(restore_cfg,
                                 lambda rng: initializer.from_scratch(rng).state_dict(), init_rng))
    if train_state is None:
      train_state = initializer.from_scratch(init_rng)
    utils.log_model_info(os.path.join(output_dir, 'model-info.txt'),
                         initializer.global_train_state_shape, partitioner)
    t = trainer_lib.Trainer(
        model=model, train_state=train_state, partitioner=partitioner, eval_names=[],
        summary_dir=output_dir, train_state_axes=initializer.train_state_axes, rng=trainer_rng,
        learning_rate_fn=utils.create_learning_rate_scheduler(), num_microbatches=None)
    device_batch = _device_batch(partitioner, host_batch)

    def timed_step() -> float:
      start = time.perf_counter()
      first_step = int(utils.get_local_data(t.train_state.step))
      t.train(iter([device_batch]), 1, start_step=first_step)
      return time.perf_counter() - start

    first = timed_step()
    timed_step()
    step_secs = [timed_step() for _ in range(steps)]
    memory = _peak_memory_gib()
    manager.save(t.train_state, save_cfg.state_transformation_fns)
    t.close()
  flops = train_flops_per_step(model_sizes.t5_1_1_size(size_name), batch, input_length,
                               target_length)
  row = _summarise(step_secs, first, flops, batch * (input_length + target_length),
                   _jax_matmul_flops(dtype), memory)
  row.update(model_options)
  row.update(system='t5train (notebook API)', device=str(jax.devices()[0].device_kind),
             jax_version=jax.__version__)
  return row


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _measure_t5train_checkpoint(size_name: str, batch: int, input_length: int,
                                target_length: int, steps: int, dtype: str,
                                **model_options: Any) -> dict[str, Any]:
  """Save and restore times of the whole train state, and the step time while an async save runs."""
  import tempfile

  import jax

  from t5train import checkpoints
  t, device_batch, initializer = _t5train_setup(size_name, batch, input_length, target_length,
                                                dtype, **model_options)
  for _ in range(2):
    _timed_step(t, device_batch)
  baseline = statistics.median(_timed_step(t, device_batch) for _ in range(steps))

  def manager(directory: str, use_async: bool) -> checkpoints.CheckpointManager:
    config = checkpoints.SaveCheckpointConfig(period=None, save_dataset=False, use_async=use_async)
    return checkpoints.CheckpointManager(directory, config, initializer.train_state_shardings,
                                         initializer.global_train_state_shape)

  with tempfile.TemporaryDirectory() as root:
    sync = manager(os.path.join(root, 'sync'), use_async=False)
    start = time.perf_counter()
    sync.save(t.train_state, force=True)
    sync.wait_until_finished()
    save_secs = time.perf_counter() - start
    step = int(jax.device_get(t.train_state.step))
    size_bytes = _directory_bytes(checkpoints.checkpoint_dir(sync.directory, step))
    start = time.perf_counter()
    jax.block_until_ready(sync.restore(step))
    restore_secs = time.perf_counter() - start
    sync.close()

    background = manager(os.path.join(root, 'async'), use_async=True)
    start = time.perf_counter()
    background.save(t.train_state, force=True)
    blocking_secs = time.perf_counter() - start
    during = [_timed_step(t, device_batch) for _ in range(steps)]
    background.wait_until_finished()
    async_total_secs = time.perf_counter() - start
    background.close()
  return {'system': 't5train (JAX)', 'checkpoint_mb': size_bytes / 1e6,
          'save_secs': save_secs, 'save_mb_per_sec': size_bytes / 1e6 / save_secs,
          'restore_secs': restore_secs, 'restore_mb_per_sec': size_bytes / 1e6 / restore_secs,
          'async_blocking_secs': blocking_secs, 'async_total_secs': async_total_secs,
          'step_secs_baseline': baseline, 'step_secs_during_async_save': statistics.median(during),
          'device': str(jax.devices()[0].device_kind), 'jax_version': jax.__version__}


def _transformers_t5(size: dict[str, Any], dtype: str) -> tuple[Any, str]:
  """transformers' T5 1.1 of ``size`` (seed 0) on the GPU if there is one, and that device."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=size['vocab_size'], d_model=size['emb_dim'], d_kv=size['head_dim'],
      d_ff=size['mlp_dim'], num_layers=size['num_encoder_layers'],
      num_decoder_layers=size['num_decoder_layers'], num_heads=size['num_heads'],
      feed_forward_proj='gated-gelu', dropout_rate=0.0, tie_word_embeddings=False,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  model = transformers.T5ForConditionalGeneration(config)
  # T5's own initialisation of the untied output layer; transformers' default (std 1.0)
  # drives gradients into subnormal floats on CPUs and would make PyTorch look 3x slower.
  model.lm_head.weight = torch.nn.Parameter(torch.randn(size['vocab_size'], size['emb_dim']) *
                                            size['emb_dim']**-0.5)
  return model.to(device=device, dtype=torch_dtype), device


def _torch_t5_batch(size: dict[str, Any], batch: int, input_length: int, target_length: int,
                    device: str) -> tuple[Any, Any]:
  """Random encoder inputs and labels (seed 0) for transformers' T5 of ``size``."""
  import torch
  gen = torch.Generator().manual_seed(0)
  inputs = torch.randint(2, size['vocab_size'], (batch, input_length), generator=gen).to(device)
  labels = torch.randint(2, size['vocab_size'], (batch, target_length), generator=gen).to(device)
  return inputs, labels


def _torch_steps(model: Any, optimizer: Any, device: str, steps: int, input_ids: Any,
                 labels: Any) -> tuple[float, list[float], float]:
  """(first step's seconds, ``steps`` timed warm steps' seconds after one untimed one, peak
  memory in GiB) of eager PyTorch training steps on one batch."""
  import torch

  def timed_step() -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=labels).loss.backward()
    optimizer.step()
    if device == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start

  first = timed_step()
  timed_step()
  step_secs = [timed_step() for _ in range(steps)]
  memory = (torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else _peak_rss_gib())
  return first, step_secs, memory


def _measure_transformers(size_name: str, batch: int, input_length: int, target_length: int,
                          steps: int, dtype: str) -> dict[str, Any]:
  import torch
  import transformers
  size = model_sizes.t5_1_1_size(size_name)
  model, device = _transformers_t5(size, dtype)
  model = model.train()
  optimizer = transformers.optimization.Adafactor(model.parameters(), lr=1e-3,
                                                  relative_step=False, scale_parameter=True,
                                                  warmup_init=False)
  inputs, labels = _torch_t5_batch(size, batch, input_length, target_length, device)

  first, step_secs, memory = _torch_steps(model, optimizer, device, steps, inputs, labels)
  flops = train_flops_per_step(size, batch, input_length, target_length)
  row = _summarise(step_secs, first, flops, batch * (input_length + target_length),
                   _jax_matmul_flops(dtype), memory)
  if device == 'cuda':
    row.update(_datasheet(row, torch.cuda.get_device_name(), dtype))
  row.update(system='transformers (PyTorch eager)', device=device,
             torch_version=torch.__version__, transformers_version=transformers.__version__,
             batch_size=batch)
  return row


def _prefix_lm_batch(vocab_size: int, batch: int, input_length: int, target_length: int
                     ) -> dict[str, Any]:
  """Random prefix-LM rows: ``input_length`` input tokens then ``target_length`` targets, the
  loss on the targets only (what seqio's PrefixLMFeatureConverter makes of full examples)."""
  import numpy as np
  length = input_length + target_length
  targets = np.random.default_rng(0).integers(2, vocab_size, (batch, length)).astype(np.int32)
  positions = np.arange(length)[None, :].repeat(batch, 0)
  return {'decoder_target_tokens': targets,
          'decoder_input_tokens': np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
          'decoder_loss_weights': (positions >= input_length).astype(np.float32),
          'decoder_causal_attention': (positions <= input_length).astype(np.int32)}


def _measure_t5train_decoder_only(size_name: str, batch: int, input_length: int,
                                  target_length: int, steps: int, dtype: str,
                                  **model_options: Any) -> dict[str, Any]:
  """A prefix LM of gin/models/decoder_only/<size>.gin, assembled as the train binary does."""
  import jax

  from t5train import assembly, decoder_only_network, models, network, optimizers, partitioning
  size = model_sizes.model_size('decoder_only', size_name)
  config = network.T5Config(**size, dtype=dtype, dropout_rate=0.0, **model_options)
  model = models.DecoderOnlyModel(decoder_only_network.DecoderOnlyTransformer(config), None,
                                  optimizers.Adafactor(), inputs_bidirectional_attention=True,
                                  z_loss=1e-4)
  host_batch = _prefix_lm_batch(config.vocab_size, batch, input_length, target_length)
  partitioner = partitioning.PjitPartitioner()
  parts = assembly.assemble_training(
      model, partitioner, {name: value.shape for name, value in host_batch.items()},
      learning_rate_fn=optimizers.create_learning_rate_scheduler('constant', 1e-3))
  t, device_batch = parts.trainer, _device_batch(partitioner, host_batch)
  first = _timed_step(t, device_batch)
  _timed_step(t, device_batch)
  step_secs = [_timed_step(t, device_batch) for _ in range(steps)]
  length = input_length + target_length
  row = _summarise(step_secs, first, decoder_only_train_flops_per_step(size, batch, length),
                   batch * length, _jax_matmul_flops(dtype), _peak_memory_gib())
  row.update(model_options)
  row.update(system='t5train decoder-only (JAX)', device=str(jax.devices()[0].device_kind),
             jax_version=jax.__version__)
  return row


def _transformers_causal_lm(size: dict[str, Any], length: int, dtype: str) -> tuple[Any, str]:
  """transformers' Mistral of the decoder-only ``size`` (seed 0), sequences up to ``length``,
  on the GPU if there is one, and that device."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.MistralConfig(
      vocab_size=size['vocab_size'], hidden_size=size['emb_dim'],
      intermediate_size=size['mlp_dim'], num_hidden_layers=size['num_decoder_layers'],
      num_attention_heads=size['num_heads'], num_key_value_heads=size['num_heads'],
      head_dim=size['head_dim'], hidden_act='gelu_pytorch_tanh', tie_word_embeddings=True,
      max_position_embeddings=length, attention_dropout=0.0, sliding_window=None,
      pad_token_id=0, eos_token_id=1, bos_token_id=0)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  return transformers.MistralForCausalLM(config).to(device=device, dtype=torch_dtype), device


def _measure_transformers_causal_lm(size_name: str, batch: int, input_length: int,
                                    target_length: int, steps: int, dtype: str) -> dict[str, Any]:
  """transformers' closest decoder-only model to T5X's: Mistral without a sliding window, i.e.
  Llama's layers (RMS norm, gated MLP, no biases, tied logits) with head_dim free of the width
  (which Llama's config refuses), rotary positions instead of relative biases."""
  import torch
  import transformers
  size = model_sizes.model_size('decoder_only', size_name)
  model, device = _transformers_causal_lm(size, input_length + target_length, dtype)
  model = model.train()
  optimizer = transformers.optimization.Adafactor(model.parameters(), lr=1e-3,
                                                  relative_step=False, scale_parameter=True,
                                                  warmup_init=False)
  host = _prefix_lm_batch(size['vocab_size'], batch, input_length, target_length)
  tokens = torch.from_numpy(host['decoder_target_tokens']).long().to(device)
  labels = tokens.clone()
  labels[:, :input_length] = -100  # the loss on the targets only, as the prefix LM's

  first, step_secs, memory = _torch_steps(model, optimizer, device, steps, tokens, labels)
  length = input_length + target_length
  row = _summarise(step_secs, first, decoder_only_train_flops_per_step(size, batch, length),
                   batch * length, _jax_matmul_flops(dtype), memory)
  row.update(system='transformers Mistral (PyTorch)', device=device,
             torch_version=torch.__version__, transformers_version=transformers.__version__)
  return row


LORA_RANK, LORA_ALPHA, NUM_PROMPTS = 8, 16.0, 100


def _finetune_model(size_name: str, dtype: str, method: str, **model_options: Any) -> Any:
  """T5 1.1 of ``size_name`` set up for one way of fine-tuning (see --finetune_methods)."""
  from t5train import models, network, optimizers
  adapters = {}
  optimizer: Any = optimizers.Adafactor()
  if method == 'full_adamw':
    optimizer = optimizers.AdamW()
  elif method == 'lora':
    adapters = dict(lora=network.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA))
    optimizer = optimizers.MultiOptimizer([(r'.*/lora_[ab]', optimizers.AdamW())])
  elif method == 'prompt':
    adapters = dict(num_prompts=NUM_PROMPTS)
    optimizer = optimizers.MultiOptimizer([('encoder/prompt/prompt', optimizers.Adafactor())])
  elif method != 'full_adafactor':
    raise ValueError(f'unknown fine-tuning method {method!r}')
  config = _t5_config(size_name, dtype, **adapters, **model_options)
  return models.EncoderDecoderModel(network.Transformer(config), None, None, optimizer,
                                    z_loss=1e-4)


FINETUNE_SYSTEMS = {'full_adafactor': 't5train full (Adafactor)',
                    'full_adamw': 't5train full (AdamW)',
                    'lora': f't5train LoRA r{LORA_RANK} q,v (AdamW)',
                    'prompt': f't5train prompt tuning ({NUM_PROMPTS})'}


def _measure_t5train_finetune(size_name: str, batch: int, input_length: int, target_length: int,
                              steps: int, dtype: str, method: str,
                              **model_options: Any) -> dict[str, Any]:
  """One fine-tuning step of T5 1.1 ``size_name`` by ``method``, assembled as the binary does."""
  import jax

  from t5train import assembly, optimizers, partitioning
  model = _finetune_model(size_name, dtype, method, **model_options)
  _, host_batch = _t5train_model_and_batch(size_name, batch, input_length, target_length, dtype)
  partitioner = partitioning.PjitPartitioner()
  parts = assembly.assemble_training(
      model, partitioner, {name: value.shape for name, value in host_batch.items()},
      learning_rate_fn=optimizers.create_learning_rate_scheduler('constant', 1e-3))
  t, device_batch = parts.trainer, _device_batch(partitioner, host_batch)
  first = _timed_step(t, device_batch)
  _timed_step(t, device_batch)
  step_secs = [_timed_step(t, device_batch) for _ in range(steps)]
  memory = _peak_memory_gib()
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  row = _summarise(step_secs, first, train_flops_per_step(model_sizes.t5_1_1_size(size_name),
                                                          batch, input_length, target_length),
                   batch * (input_length + target_length), _jax_matmul_flops(dtype), memory)
  row.update(model_options)
  analysis = next(iter(t._compiled.values())).memory_analysis()  # pylint: disable=protected-access
  row.update(system=FINETUNE_SYSTEMS[method], method=method,
             # What the compiled step holds: its inputs (the state, in place) and its scratch
             # space (activations, and gradients and updates of what it trains).
             step_arguments_gib=analysis.argument_size_in_bytes / 2**30,
             step_temp_gib=analysis.temp_size_in_bytes / 2**30,
             optimizer_state_floats=sum(x.size for x in leaves(t.train_state.opt_state)),
             parameter_floats=sum(x.size for x in leaves(t.train_state.params)),
             device=str(jax.devices()[0].device_kind), jax_version=jax.__version__)
  return row


def _measure_transformers_lora(size_name: str, batch: int, input_length: int, target_length: int,
                               steps: int, dtype: str, method: str = 'lora') -> dict[str, Any]:
  """PEFT's LoRA (rank 8, alpha 16, on q and v) on transformers' T5 1.1, with torch's AdamW."""
  del method
  import peft
  import torch
  import transformers
  size = model_sizes.t5_1_1_size(size_name)
  model, device = _transformers_t5(size, dtype)
  model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                     target_modules=['q', 'v'], lora_dropout=0.0))
  model = model.train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                weight_decay=0.0)
  inputs, labels = _torch_t5_batch(size, batch, input_length, target_length, device)

  first, step_secs, memory = _torch_steps(model, optimizer, device, steps, inputs, labels)
  row = _summarise(step_secs, first, train_flops_per_step(size, batch, input_length,
                                                          target_length),
                   batch * (input_length + target_length), _jax_matmul_flops(dtype), memory)
  row.update(system=f'transformers + PEFT LoRA r{LORA_RANK} q,v', method='lora', device=device,
             torch_version=torch.__version__, transformers_version=transformers.__version__,
             peft_version=peft.__version__)
  return row


def _beams(method: str) -> int:
  return 1 if method == 'greedy' else int(method.removeprefix('beam'))


def _decode_fn(method: str) -> Any:
  import functools

  from t5train import decoding
  beams = _beams(method)
  return (functools.partial(decoding.temperature_sample, temperature=0.0) if beams == 1
          else functools.partial(decoding.beam_search, num_decodes=beams, alpha=0.6))


def _time_predict(model: Any, shapes: dict[str, tuple[int, ...]], batch_in: dict[str, Any],
                  target_length: int, repeats: int, batch: int) -> dict[str, Any]:
  """A decode row of ``model.predict_batch`` (jitted) on ``batch_in``, random parameters."""
  import flax.linen as nn
  import jax
  import numpy as np

  from t5train import partitioning
  partitioner = partitioning.PjitPartitioner()
  params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes)['params'])(
      jax.random.PRNGKey(0))
  params = nn.unbox(params)
  sharding = partitioner.sharding(partitioner.data_partition_spec)
  device_batch = {name: jax.device_put(np.asarray(value, np.int32), sharding)
                  for name, value in batch_in.items()}
  predict = jax.jit(lambda p, x: model.predict_batch(p, x, max_decode_length=target_length))

  def timed() -> float:
    start = time.perf_counter()
    jax.block_until_ready(predict(params, device_batch))
    return time.perf_counter() - start

  first = timed()
  secs = [timed() for _ in range(repeats)]
  return _decode_row(secs, first, batch, target_length, 't5train (JAX)',
                     device=str(jax.devices()[0].device_kind), jax_version=jax.__version__)


def _measure_t5train_decode(size_name: str, batch: int, input_length: int, target_length: int,
                            repeats: int, dtype: str, method: str,
                            **model_options: Any) -> dict[str, Any]:
  import types

  import numpy as np

  from t5train import models, network
  config = _t5_config(size_name, dtype, **model_options)
  # An EOS id that is never produced, so that every decode runs to the full length.
  model = models.EncoderDecoderModel(network.Transformer(config), None,
                                     types.SimpleNamespace(eos_id=-1), None,
                                     decode_fn=_decode_fn(method))
  inputs = np.random.default_rng(0).integers(2, config.vocab_size, (batch, input_length))
  shapes = {'encoder_input_tokens': (batch, input_length),
            'decoder_input_tokens': (batch, target_length),
            'decoder_target_tokens': (batch, target_length)}
  row = _time_predict(model, shapes, {'encoder_input_tokens': inputs}, target_length, repeats,
                      batch)
  return row | _decode_limits(row['sec_per_decode_median'], size_name, batch, input_length,
                              target_length, _beams(method), dtype)


def _decode_limits(secs: float, size_name: str, batch: int, input_length: int,
                   target_length: int, beams: int, dtype: str) -> dict[str, Any]:
  """How near a decode of ``secs`` is to this process's limits: its FLOPs over the measured
  matmul rate (the bound at batch), and the weight traffic floor over its time (at batch 1)."""
  size = model_sizes.t5_1_1_size(size_name)
  flops = decode_flops(size, batch, input_length, target_length, beams)
  bytes_per_param = 2 if dtype == 'bfloat16' else 4
  floor = decode_weight_bytes(size, input_length, target_length, bytes_per_param) / (
      _memory_bandwidth())
  peak = _jax_matmul_flops(dtype)
  return {'model_tflops_per_decode': flops / 1e12, 'achieved_tflops': flops / secs / 1e12,
          'peak_tflops_measured': peak / 1e12, 'mfu': flops / secs / peak,
          'bandwidth_floor_secs': floor, 'bandwidth_floor_share': floor / secs}


def _measure_transformers_decode(size_name: str, batch: int, input_length: int,
                                 target_length: int, repeats: int, dtype: str,
                                 method: str, compiled: bool = False) -> dict[str, Any]:
  """transformers' ``generate``: eager with its dynamic cache, or (``compiled``) with its static
  cache and the model's forward compiled by ``torch.compile``, as its docs advise for speed."""
  size = model_sizes.t5_1_1_size(size_name)
  model, device = _transformers_t5(size, dtype)
  return _time_generate(model, device, size['vocab_size'], batch, input_length, target_length,
                        repeats, method, compiled)


def _time_generate(model: Any, device: str, vocab_size: int, batch: int, input_length: int,
                   target_length: int, repeats: int, method: str, compiled: bool
                   ) -> dict[str, Any]:
  """A decode row of ``model.generate`` on random inputs (the prompt, for a causal LM)."""
  import torch
  import transformers
  model = model.eval()
  options = {}
  if compiled:
    model.forward = torch.compile(model.forward, dynamic=False)
    options = {'cache_implementation': 'static'}
  gen = torch.Generator().manual_seed(0)
  inputs = torch.randint(2, vocab_size, (batch, input_length), generator=gen).to(device)
  beams = _beams(method)

  def timed() -> float:
    start = time.perf_counter()
    with torch.no_grad():
      # min_new_tokens: every decode runs to the full length, as the t5train rows do.
      model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                     max_new_tokens=target_length, min_new_tokens=target_length,
                     num_beams=beams, do_sample=False,
                     length_penalty=0.6 if beams > 1 else 1.0, early_stopping=False, **options)
    if device == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start

  first = timed()
  secs = [timed() for _ in range(repeats)]
  system = ('transformers (static cache, torch.compile)' if compiled
            else 'transformers (PyTorch eager)')
  return _decode_row(secs, first, batch, target_length, system, device=device,
                     torch_version=torch.__version__,
                     transformers_version=transformers.__version__)


def _measure_transformers_causal_lm_decode(size_name: str, batch: int, input_length: int,
                                           target_length: int, repeats: int, dtype: str,
                                           method: str, compiled: bool = False
                                           ) -> dict[str, Any]:
  size = model_sizes.model_size('decoder_only', size_name)
  model, device = _transformers_causal_lm(size, input_length + target_length, dtype)
  row = _time_generate(model, device, size['vocab_size'], batch, input_length, target_length,
                       repeats, method, compiled)
  return row | _decoder_only_decode_mfu(row, size, batch, input_length, target_length, method,
                                        dtype)


def _measure_transformers_causal_lm_decode_compiled(size_name: str, batch: int,
                                                    input_length: int, target_length: int,
                                                    repeats: int, dtype: str, method: str
                                                    ) -> dict[str, Any]:
  return _measure_transformers_causal_lm_decode(size_name, batch, input_length, target_length,
                                                repeats, dtype, method, compiled=True)


def _decoder_only_decode_mfu(row: dict[str, Any], size: dict[str, Any], batch: int,
                             input_length: int, target_length: int, method: str, dtype: str
                             ) -> dict[str, Any]:
  flops = decoder_only_decode_flops(size, batch, input_length, target_length, _beams(method))
  secs, peak = row['sec_per_decode_median'], _jax_matmul_flops(dtype)
  return {'model_tflops_per_decode': flops / 1e12, 'achieved_tflops': flops / secs / 1e12,
          'peak_tflops_measured': peak / 1e12, 'mfu': flops / secs / peak}


def _measure_t5train_decoder_only_decode(size_name: str, batch: int, input_length: int,
                                         target_length: int, repeats: int, dtype: str,
                                         method: str, **model_options: Any) -> dict[str, Any]:
  """A prefix LM of gin/models/decoder_only/<size>.gin continuing ``input_length``-token
  prompts by ``target_length`` tokens (never an EOS, so every row runs to the end)."""
  import types

  from t5train import decoder_only_network, models, network
  size = model_sizes.model_size('decoder_only', size_name)
  config = network.T5Config(**size, dtype=dtype, dropout_rate=0.0, **model_options)
  model = models.DecoderOnlyModel(decoder_only_network.DecoderOnlyTransformer(config),
                                  types.SimpleNamespace(eos_id=-1), None,
                                  decode_fn=_decode_fn(method),
                                  inputs_bidirectional_attention=True)
  host = _prefix_lm_batch(config.vocab_size, batch, input_length, target_length)
  batch_in = {name: host[name] for name in ('decoder_input_tokens', 'decoder_causal_attention')}
  shapes = {name: value.shape for name, value in host.items()}
  row = _time_predict(model, shapes, batch_in, target_length, repeats, batch)
  return row | _decoder_only_decode_mfu(row, size, batch, input_length, target_length, method,
                                        dtype)


def _measure_transformers_decode_compiled(size_name: str, batch: int, input_length: int,
                                          target_length: int, repeats: int, dtype: str,
                                          method: str) -> dict[str, Any]:
  return _measure_transformers_decode(size_name, batch, input_length, target_length, repeats,
                                      dtype, method, compiled=True)


def _decode_row(secs: list[float], first_secs: float, batch: int, length: int, system: str,
                **extra: Any) -> dict[str, Any]:
  median = statistics.median(secs)
  return {'system': system, 'sec_per_decode_median': median, 'sec_per_decode_min': min(secs),
          'sec_per_decode_max': max(secs), 'tokens_per_sec': batch * length / median,
          'compile_and_first_decode_secs': first_secs, **extra}


_WORKERS = {'t5train': _measure_t5train, 't5train_notebook': _measure_t5train_notebook,
            'transformers': _measure_transformers,
            't5train_checkpoint': _measure_t5train_checkpoint,
            't5train_decode': _measure_t5train_decode,
            't5train_decoder_only': _measure_t5train_decoder_only,
            't5train_finetune': _measure_t5train_finetune,
            'transformers_lora': _measure_transformers_lora,
            'transformers_causal_lm': _measure_transformers_causal_lm,
            'transformers_decode': _measure_transformers_decode,
            'transformers_decode_compiled': _measure_transformers_decode_compiled,
            't5train_decoder_only_decode': _measure_t5train_decoder_only_decode,
            'transformers_causal_lm_decode': _measure_transformers_causal_lm_decode,
            'transformers_causal_lm_decode_compiled':
                _measure_transformers_causal_lm_decode_compiled}


def _peer_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def _model_options() -> dict[str, Any]:
  """The T5Config options of the t5train rows, from the flags."""
  return dict(scan_layers=_SCAN_LAYERS.value, remat_policy=_REMAT_POLICY.value,
              attention_implementation=_ATTENTION.value)


def _run_row(worker: str, size: str, batch: int, lengths: Sequence[int], steps: int,
             dtype: str, method: str = 'greedy') -> dict[str, Any]:
  command = [sys.executable, '-m', 'benchmarks.bench', f'--worker={worker}', f'--sizes={size}',
             f'--batch_size={batch}', f'--lengths={lengths[0]},{lengths[1]}',
             f'--steps={steps}', f'--dtype={dtype}', f'--method={method}',
             *(f'--{name}={value}' for name, value in _model_options().items()
               if value is not None)]
  if worker.startswith('t5train') and not _LOOP_BREAKDOWN.value:
    command.append('--noloop_breakdown')
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO,
                            timeout=_ROW_TIMEOUT.value)
  except subprocess.TimeoutExpired:
    return {'system': worker, 'error': [f'timed out after {_ROW_TIMEOUT.value:.0f} s']}
  if result.returncode:
    return {'system': worker, 'error': result.stderr.strip().splitlines()[-1:]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def _machine() -> str:
  """CPU model and count (the accelerator, if any, is in each row's ``device``)."""
  model = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    model = names[0] if names else model
  return f'{model}, {os.cpu_count()} CPUs'


def _ratio(row: dict[str, Any]) -> str:
  return f'{row["speedup_vs_peer"]:.2f}x' if 'speedup_vs_peer' in row else ''


def _memory_ratio(row: dict[str, Any]) -> str:
  return f'{row["memory_vs_peer"]:.2f}' if 'memory_vs_peer' in row else ''


def _datasheet_mfu(row: dict[str, Any]) -> str:
  return f'{100 * row["mfu_datasheet"]:.1f}%' if 'mfu_datasheet' in row else ''


def _breakdown(row: dict[str, Any]) -> str:
  """The training loop's seconds per step: waiting for data / computing / checkpointing."""
  phases = [row.get(f'loop_{phase}_secs_per_step') for phase in ('data', 'compute', 'checkpoint')]
  return '' if None in phases else '/'.join(f'{secs:.3f}' for secs in phases)


def _table(rows: list[dict[str, Any]]) -> str:
  header = (f'{"system":<30} {"size":<6} {"s/step":>8} {"spread":>15} {"tokens/s":>10} '
            f'{"compile+1st":>11} {"TFLOP/s":>8} {"MFU":>6} {"MFU(ds)":>7} {"peak mem":>9} '
            f'{"vs peer":>8} {"mem/peer":>8} {"loop data/compute/ckpt s":>24}')
  lines = [header, '-' * len(header)]
  for r in rows:
    if 'error' in r:
      lines.append(f'{r["system"]:<30} {r["size"]:<6} failed: {r["error"]}')
      continue
    spread = f'{r["sec_per_step_min"]:.3f}-{r["sec_per_step_max"]:.3f}'
    lines.append(
        f'{r["system"]:<30} {r["size"]:<6} {r["sec_per_step_median"]:>8.3f} {spread:>15} '
        f'{r["tokens_per_sec"]:>10,.0f} {r["compile_and_first_step_secs"]:>10.1f}s '
        f'{r["achieved_tflops"]:>8.3f} {100 * r["mfu"]:>5.1f}% {_datasheet_mfu(r):>7} '
        f'{r["peak_memory_gib"]:>7.2f}GiB '
        f'{_ratio(r):>8} {_memory_ratio(r):>8} {_breakdown(r):>24}')
  return '\n'.join(lines)


def _decode_table(rows: list[dict[str, Any]]) -> str:
  header = (f'{"system":<42} {"size":<20} {"method":<7} {"batch":>5} {"s/decode":>9} '
            f'{"spread":>15} {"tokens/s":>10} {"compile+1st":>11} {"vs peer":>8} '
            f'{"MFU":>6} {"BW floor":>8}')
  lines = [header, '-' * len(header)]
  for r in rows:
    if 'error' in r:
      lines.append(f'{r["system"]:<42} {r["size"]:<20} {r["method"]:<7} {r["batch"]:>5} '
                   f'failed: {r["error"]}')
      continue
    spread = f'{r["sec_per_decode_min"]:.3f}-{r["sec_per_decode_max"]:.3f}'
    lines.append(
        f'{r["system"]:<42} {r["size"]:<20} {r["method"]:<7} {r["batch"]:>5} '
        f'{r["sec_per_decode_median"]:>9.3f} {spread:>15} {r["tokens_per_sec"]:>10,.1f} '
        f'{r["compile_and_first_decode_secs"]:>10.1f}s {_ratio(r):>8} {_share(r, "mfu"):>6} '
        f'{_share(r, "bandwidth_floor_share"):>8}')
  return '\n'.join(lines)


def _share(row: dict[str, Any], key: str) -> str:
  return f'{100 * row[key]:.1f}%' if key in row else ''


def _paired(group: list[dict[str, Any]], peer: bool) -> list[dict[str, Any]]:
  """Each t5train row of a round that ends with the peer's row gets its tokens/s over the
  peer's as ``speedup_vs_peer`` and its peak memory over the peer's as ``memory_vs_peer``."""
  if not peer or 'error' in group[-1]:
    return group
  for row in group[:-1]:
    if 'error' not in row:
      row['speedup_vs_peer'] = row['tokens_per_sec'] / group[-1]['tokens_per_sec']
      if 'peak_memory_gib' in row:
        row['memory_vs_peer'] = row['peak_memory_gib'] / group[-1]['peak_memory_gib']
  return group


def _train_rows(peer: bool, lengths: list[int]) -> list[dict[str, Any]]:
  """t5train (binary's assembly, then notebook API) and the peer take turns (A B C A B C), so
  that drift in the machine hits all of them."""
  workers = ['t5train'] + (['t5train_notebook'] if _NOTEBOOK_ROWS.value else [])
  workers += ['transformers'] if peer else []
  rows = []
  for size in _SIZES.value:
    for _ in range(_TRAIN_ROUNDS.value):
      group = []
      for worker in workers:
        row = _run_row(worker, size, _BATCH.value, lengths, _STEPS.value, _DTYPE.value)
        row.update(size=size)
        group.append(row)
      for row in _paired(group, peer):
        print(_table([row]).splitlines()[-1], flush=True)
      rows.extend(group)
  return rows


def _decoder_only_rows(peer: bool, lengths: list[int]) -> list[dict[str, Any]]:
  """t5train's prefix LM and transformers' Mistral take turns, ``train_rounds`` times per size."""
  workers = ['t5train_decoder_only'] + (['transformers_causal_lm'] if peer else [])
  rows = []
  for size in _DECODER_ONLY_SIZES.value:
    for _ in range(_TRAIN_ROUNDS.value):
      group = []
      for worker in workers:
        row = _run_row(worker, size, _BATCH.value, lengths, _STEPS.value, _DTYPE.value)
        row.update(size=size)
        group.append(row)
      for row in _paired(group, peer):
        print(_table([row]).splitlines()[-1], flush=True)
      rows.extend(group)
  return rows


def _finetune_rows(peer: bool, lengths: list[int]) -> list[dict[str, Any]]:
  """Each fine-tuning method once per size; t5train's LoRA and PEFT's take turns."""
  rows = []
  for size in _FINETUNE_SIZES.value:
    for method in _FINETUNE_METHODS.value:
      group = [_run_row('t5train_finetune', size, _BATCH.value, lengths, _STEPS.value,
                        _DTYPE.value, method)]
      if method == 'lora' and peer:
        group.append(_run_row('transformers_lora', size, _BATCH.value, lengths, _STEPS.value,
                              _DTYPE.value, method))
      for row in group:
        row.update(size=size)
      for row in _paired(group, peer and len(group) > 1):
        print(_table([row]).splitlines()[-1], flush=True)
      rows.extend(group)
  return rows


_DECODE_WORKERS = {  # t5train's, transformers' compiled and transformers' eager
    't5': ('t5train_decode', 'transformers_decode_compiled', 'transformers_decode'),
    'decoder_only': ('t5train_decoder_only_decode', 'transformers_causal_lm_decode_compiled',
                     'transformers_causal_lm_decode')}


def _decode_rows(peer: bool, lengths: list[int]) -> list[dict[str, Any]]:
  """t5train and the peers take turns (A B C A B C), so that drift in the machine hits all."""
  rows = []
  models = ([('t5', size) for size in _DECODE_SIZES.value] +
            [('decoder_only', size) for size in _DECODE_DECODER_ONLY_SIZES.value])
  for family, size in models:
    ours, compiled, eager = _DECODE_WORKERS[family]
    workers = [ours] + ([compiled] if peer and _DECODE_COMPILED.value else [])
    workers += [eager] if peer else []
    for method in _DECODE_METHODS.value:
      for batch in (int(b) for b in _DECODE_BATCHES.value):
        group = []
        for worker in workers:
          row = _run_row(worker, size, batch, lengths, _DECODE_REPEATS.value, _DTYPE.value,
                         method)
          row.update(size=size if family == 't5' else f'{size} (decoder-only)', method=method,
                     batch=batch)
          group.append(row)
        group = _paired(group, peer)
        if len(group) == 3 and 'error' not in group[0] and 'error' not in group[1]:
          group[0]['speedup_vs_compiled_peer'] = (group[0]['tokens_per_sec'] /
                                                  group[1]['tokens_per_sec'])
        for row in group:
          print(_decode_table([row]).splitlines()[-1], flush=True)
        rows.extend(group)
  return rows


def _checkpoint_table(rows: list[dict[str, Any]]) -> str:
  header = (f'{"size":<6} {"MB":>8} {"save s":>7} {"MB/s":>7} {"restore s":>9} {"MB/s":>7} '
            f'{"async blocks s":>14} {"step s":>7} {"step s during async save":>24}')
  lines = [header, '-' * len(header)]
  for r in rows:
    if 'error' in r:
      lines.append(f'{r["size"]:<6} failed: {r["error"]}')
      continue
    lines.append(
        f'{r["size"]:<6} {r["checkpoint_mb"]:>8.1f} {r["save_secs"]:>7.2f} '
        f'{r["save_mb_per_sec"]:>7.1f} {r["restore_secs"]:>9.2f} {r["restore_mb_per_sec"]:>7.1f} '
        f'{r["async_blocking_secs"]:>14.2f} {r["step_secs_baseline"]:>7.3f} '
        f'{r["step_secs_during_async_save"]:>24.3f}')
  return '\n'.join(lines)


def _checkpoint_rows(lengths: list[int]) -> list[dict[str, Any]]:
  rows = []
  for size in _CHECKPOINT_SIZES.value:
    row = _run_row('t5train_checkpoint', size, _BATCH.value, lengths, _STEPS.value, _DTYPE.value)
    row.update(size=size)
    rows.append(row)
    print(_checkpoint_table([row]).splitlines()[-1], flush=True)
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  lengths = [int(x) for x in _LENGTHS.value]
  if _WORKER.value:
    measure = _WORKERS[_WORKER.value]
    args = (_SIZES.value[0], _BATCH.value, lengths[0], lengths[1], _STEPS.value, _DTYPE.value)
    if _WORKER.value.endswith(('_decode', '_decode_compiled', '_finetune', '_lora')):
      args += (_METHOD.value,)
    model_options = (_model_options() if _WORKER.value.startswith('t5train') else {})
    row = measure(*args, **model_options)
    print(json.dumps(row))
    return
  known = model_sizes.known_sizes()
  unknown = (set(_SIZES.value) | set(_DECODE_SIZES.value) | set(_CHECKPOINT_SIZES.value)) - set(known)
  if unknown:
    raise app.UsageError(f'unknown sizes {sorted(unknown)}; known (gin/models/t5_1_1/): {known}')
  known = model_sizes.known_sizes('decoder_only')
  unknown = (set(_DECODER_ONLY_SIZES.value) | set(_DECODE_DECODER_ONLY_SIZES.value)) - set(known)
  if unknown:
    raise app.UsageError(f'unknown decoder-only sizes {sorted(unknown)}; known '
                         f'(gin/models/decoder_only/): {known}')
  peer = _PEER.value == 'transformers' or (_PEER.value == 'auto' and _peer_available())
  rows = _train_rows(peer, lengths) if 'train' in _WORKLOADS.value else []
  decoder_only_rows = (_decoder_only_rows(peer, lengths)
                       if 'decoder_only' in _WORKLOADS.value else [])
  finetune_rows = _finetune_rows(peer, lengths) if 'finetune' in _WORKLOADS.value else []
  decode_rows = _decode_rows(peer, lengths) if 'decode' in _WORKLOADS.value else []
  checkpoint_rows = _checkpoint_rows(lengths) if 'checkpoint' in _WORKLOADS.value else []
  report = {'machine': _machine(),
            'batch_size': _BATCH.value, 'lengths': lengths, 'dtype': _DTYPE.value,
            **_model_options(),
            'timed_steps': _STEPS.value, 'rows': rows, 'decoder_only_rows': decoder_only_rows,
            'finetune_rows': finetune_rows,
            'decode_repeats': _DECODE_REPEATS.value, 'decode_rows': decode_rows,
            'checkpoint_rows': checkpoint_rows}
  if rows:
    print()
    print(f'train: batch {_BATCH.value}, lengths {lengths[0]}/{lengths[1]}, {_DTYPE.value}, '
          f'Adafactor, median of {_STEPS.value} warm steps; MFU against a matmul measured in the '
          'same process; t5train ' +
          ', '.join(f'{name}={value}' for name, value in _model_options().items()))
    print(_table(rows))
  if decoder_only_rows:
    print()
    print(f'decoder-only train: batch {_BATCH.value}, rows of {lengths[0]} input + {lengths[1]} '
          f'target tokens (loss on the targets), {_DTYPE.value}, Adafactor, median of '
          f'{_STEPS.value} warm steps; t5train prefix LM (gin/models/decoder_only) beside '
          "transformers' Mistral of the same dimensions")
    print(_table(decoder_only_rows))
  if finetune_rows:
    print()
    print(f'fine-tuning: batch {_BATCH.value}, lengths {lengths[0]}/{lengths[1]}, {_DTYPE.value}, '
          f'median of {_STEPS.value} warm steps; peak memory is the process\'s peak RSS on CPU')
    print(_table(finetune_rows))
  if decode_rows:
    print()
    print(f'decode: input length {lengths[0]}, {lengths[1]} new tokens per sequence (full length), '
          f'{_DTYPE.value}, median of {_DECODE_REPEATS.value} decodes; tokens/s counts generated '
          'tokens of the best sequence; beam search with length penalty 0.6')
    print(_decode_table(decode_rows))
  if checkpoint_rows:
    print()
    print('checkpoint: the whole train state (float32 parameters, Adafactor state), Orbax, local '
          f'disk; step time is the median of {_STEPS.value} steps, with and without a save in '
          'flight')
    print(_checkpoint_table(checkpoint_rows))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    with open(_OUT.value, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'\nwrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
