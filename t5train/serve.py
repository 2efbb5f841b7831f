"""``python -m t5train.serve``: serve a checkpoint over HTTP, with dynamic batching (docs/serving.md).

    python -m t5train.serve --gin_file=/tmp/run/config.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \\
        --port=8000

Gin binds the arguments of ``serve`` (see gin/runs/serve.gin, which is read first unless a
``serve.gin`` is named): the model, the checkpoint (a ``checkpoint_<step>`` directory or a model
directory for its newest; t5train's, LoRA with its base, or T5X's), the batching and the request
limits. The process restores the parameters, compiles the warm-up programs, then listens on
``--host``:``--port``. SIGTERM (or Ctrl-C) stops it taking connections, answers the requests in
flight (at most ``shutdown_timeout_secs``) and exits 0.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import uvicorn
from absl import flags, logging

from t5train import (
  batching,
  checkpoint_reading,
  checkpoints,
  gin_utils,
  inference,
  models,
  partitioning,
  serving,
)
from t5train.errors import UserError

_GUARD = gin_utils.GinCallGuard()
# Defined once although ``python -m t5train.serve`` runs this file twice (as __main__, then as
# the importable t5train.serve whose function gin binds).
if 'port' not in flags.FLAGS:
  flags.DEFINE_string('host', None, 'Address to listen on (overrides serve.host); 0.0.0.0 for '
                      'every interface.')
  flags.DEFINE_integer('port', None, 'Port to listen on (overrides serve.port); 0: any free port '
                       '(the "listening on" line names it).', lower_bound=0)


def load_batcher(model: models.BaseTransformerModel, partitioner: partitioning.PjitPartitioner,
                 restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig,
                 batching_cfg: batching.BatchingConfig, random_seed: int = 0
                 ) -> tuple[batching.Batcher, int]:
  """The newest checkpoint's parameters in a Batcher, its warm-up programs compiled; and the
  checkpoint's step."""
  step, checkpoint_dir = checkpoints.select_checkpoints(restore_checkpoint_cfg)[-1]
  partitioner.validate()
  lengths = {'inputs': batching_cfg.input_lengths[-1], 'targets': batching_cfg.target_lengths[-1]}
  initializer = inference.params_initializer(model, partitioner, batching_cfg.batch_sizes[-1],
                                             lengths)
  try:
    params = checkpoint_reading.restore_params(checkpoint_dir, initializer,
                                               restore_checkpoint_cfg.dtype)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a damaged or foreign directory)
    reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise UserError(f'cannot read the checkpoint {checkpoint_dir}: {reason}') from e
  logging.info('Restored step %d from %s.', step, checkpoint_dir)
  batcher = batching.Batcher(model, partitioner, params,
                             initializer.train_state_shardings.params, batching_cfg,
                             seed=random_seed)
  batcher.warm_up()
  return batcher, step


def _listen_address(host: str, port: int) -> tuple[str, int]:
  """The flags' values where given (they win over gin, as ``--shard_id`` does for infer)."""
  if flags.FLAGS.is_parsed():
    host = flags.FLAGS.host if flags.FLAGS.host is not None else host
    port = flags.FLAGS.port if flags.FLAGS.port is not None else port
  return host, port


def serve(*, model: models.BaseTransformerModel, partitioner: partitioning.PjitPartitioner,
          restore_checkpoint_cfg: checkpoints.RestoreCheckpointConfig,
          batching_cfg: batching.BatchingConfig | None = None,
          limits: serving.RequestLimits | None = None, host: str = '127.0.0.1',
          port: int = 8000, shutdown_timeout_secs: float = 30.0,
          random_seed: int | None = 0) -> None:
  """Serves ``model`` with the checkpoint's parameters until SIGTERM or SIGINT."""
  _GUARD.enter()
  random_seed = gin_utils.resolve_random_seed(random_seed, serve)
  batching_cfg = batching_cfg or batching.BatchingConfig()
  limits = limits or serving.RequestLimits()
  host, port = _listen_address(host, port)
  batcher, step = load_batcher(model, partitioner, restore_checkpoint_cfg, batching_cfg,
                               random_seed)
  app = serving.create_app(batcher, limits, model_name=f'step {step}',
                           on_shutdown=lambda: batcher.close(shutdown_timeout_secs))
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning',
                                         timeout_graceful_shutdown=shutdown_timeout_secs))
  # uvicorn re-raises the stop signal once it has shut down; this handler makes that exit 0.
  previous = {sig: signal.signal(sig, lambda number, frame: logging.info('Stopped by signal %d.',
                                                                         number))
              for sig in (signal.SIGTERM, signal.SIGINT)}
  original_startup = server.startup

  async def startup(sockets: Any = None) -> None:
    await original_startup(sockets)
    for bound in server.servers:
      for sock in bound.sockets:
        address = sock.getsockname()
        # One line a script can wait for (the tests do), with the port when --port=0.
        print(f't5train.serve: listening on http://{address[0]}:{address[1]}', flush=True)

  server.startup = startup
  try:
    server.run()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    batcher.close(shutdown_timeout_secs)
  if not server.started:
    raise UserError(f'cannot listen on {host}:{port} (in use, or not an address of this machine)')


console_binary = gin_utils.configured_binary(serve, _GUARD, 't5train.serve')


def console_main() -> None:
  """The binary: gin/runs/serve.gin comes first unless the command line names a serve.gin."""
  if not any(arg.startswith('--gin_file') and arg.endswith('serve.gin') for arg in sys.argv[1:]):
    sys.argv[1:1] = ['--gin_file=runs/serve.gin']
  console_binary()


if __name__ == '__main__':
  # Gin files bind ``t5train.serve.serve``; run the importable copy of this module.
  from t5train import serve as _serve_module  # pylint: disable=g-import-not-at-top
  _serve_module.console_main()
