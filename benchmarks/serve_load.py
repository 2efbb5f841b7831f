"""``python -m benchmarks.serve_load`` (part of ``make bench``): the serve API under concurrent load.

One run, one process, T5 1.1 small (random weights, byte vocabulary, float32), three servers
behind the same HTTP stack (Starlette + uvicorn on 127.0.0.1), one after the other:

* ``t5train dynamic``: ``serving.create_app`` over a ``batching.Batcher`` (batch sizes 1/8/32,
  a 5 ms window): what ``t5train.serve`` runs;
* ``t5train naive``: the same app and model, one request at a time (batch size 1, no window):
  the hand-written loop around a decoder;
* ``transformers generate``: the same weights exported to transformers (``convert.export_hf``),
  ``generate`` (greedy) one request at a time behind a lock.

Each is driven by N concurrent clients (1, 8, 64; httpx, asyncio), each sending one sentence of
Python's own documentation (mixed lengths, up to 128 bytes) per request, for ``--secs`` seconds
per level (then the requests in flight finish). Reported: requests/s, generated tokens/s,
p50/p95/p99 latency, and for the dynamic server the ratios the issue asks for.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from typing import Any

import httpx
import jax
import uvicorn
from absl import app, flags

_SECS = flags.DEFINE_float('secs', 8.0, 'Seconds of load per (server, concurrency) pair.')
_CLIENTS = flags.DEFINE_list('clients', ['1', '8', '64'], 'Concurrent clients per level.')
_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens decoded per request.')
_PEER = flags.DEFINE_boolean('peer', True, 'Also serve transformers\' generate (if installed).')
_OUT = flags.DEFINE_string('out', 'docs/bench/cpu_serve.json', 'Where to write the JSON results.')
_SWEEP = flags.DEFINE_list(
    'sweep', [], "Instead of the three servers: the dynamic server with each 'SIZES@WINDOW' "
    "setting (e.g. '1/4/16@5,1/8/32@20': batch sizes 1, 4, 16 with a 5 ms window, ...), one "
    'after the other, at each --clients level.')

INPUT_LENGTH = 128
WINDOW_MS = 5.0
BATCH_SIZES = (1, 8, 32)


def sentences() -> list[str]:
  """Sentences of Python's documentation, 20 to 200 characters, in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  found = []
  for name in sorted(topics.topics):
    for sentence in re.split(r'(?<=\.)\s+', topics.topics[name]):
      sentence = ' '.join(sentence.split())
      if 20 <= len(sentence) <= 200 and sentence.isascii():
        found.append(sentence)
  return found[:2000]


def _small_model() -> tuple[Any, Any]:
  import seqio  # pylint: disable=g-import-not-at-top

  from t5train import models, network, optimizers  # pylint: disable=g-import-not-at-top
  config = network.T5Config(vocab_size=32128, dtype='float32', emb_dim=512, num_heads=6,
                            num_encoder_layers=8, num_decoder_layers=8, head_dim=64, mlp_dim=1024,
                            mlp_activations=('gelu', 'linear'), dropout_rate=0.0,
                            logits_via_embedding=False)
  vocabulary = seqio.ByteVocabulary()
  model = models.EncoderDecoderModel(network.Transformer(config), vocabulary, vocabulary,
                                     optimizers.Adafactor())
  return model, config


class _Server:
  """uvicorn serving ``asgi_app`` from a thread on a free port of 127.0.0.1."""

  def __init__(self, asgi_app: Any):
    self.server = uvicorn.Server(uvicorn.Config(asgi_app, host='127.0.0.1', port=0,
                                                log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.05)
    self.url = f'http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}'

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(60)


async def _load(url: str, clients: int, secs: float, texts: list[str], new_tokens: int
                ) -> dict[str, Any]:
  """``clients`` loops sending one sentence per request until ``secs`` have passed."""
  latencies: list[float] = []
  tokens = [0]
  errors = [0]
  started = time.perf_counter()
  limits = httpx.Limits(max_connections=clients + 4)

  async def client(number: int) -> None:
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
      sent = 0
      while time.perf_counter() - started < secs:
        text = texts[(number * 7919 + sent) % len(texts)]
        sent += 1
        begin = time.perf_counter()
        response = await http.post(f'{url}/v1/predict', json={
            'inputs': [text], 'decoding': {'max_new_tokens': new_tokens}})
        if response.status_code != 200:
          errors[0] += 1
          continue
        latencies.append(time.perf_counter() - begin)
        tokens[0] += response.json()['predictions'][0]['num_output_tokens']

  await asyncio.gather(*(client(n) for n in range(clients)))
  elapsed = time.perf_counter() - started
  ordered = sorted(latencies)
  pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None
  return {'clients': clients, 'requests': len(latencies), 'errors': errors[0],
          'secs': round(elapsed, 2), 'requests_per_sec': round(len(latencies) / elapsed, 3),
          'tokens_per_sec': round(tokens[0] / elapsed, 1),
          'latency_p50_secs': pick(0.5), 'latency_p95_secs': pick(0.95),
          'latency_p99_secs': pick(0.99),
          'latency_mean_secs': statistics.fmean(latencies) if latencies else None}


def _drive(name: str, asgi_app: Any, texts: list[str]) -> list[dict[str, Any]]:
  server = _Server(asgi_app)
  rows = []
  try:
    # Two untimed requests first (allocations, caches).
    for text in texts[:2]:
      httpx.post(f'{server.url}/v1/predict', json={'inputs': [text]}, timeout=600)
    for clients in (int(c) for c in _CLIENTS.value):
      row = {'system': name, **asyncio.run(_load(server.url, clients, _SECS.value, texts,
                                                 _NEW_TOKENS.value))}
      print(json.dumps(row), flush=True)
      rows.append(row)
  finally:
    server.stop()
  return rows


def _t5train_app(model: Any, params: Any, shardings: Any, partitioner: Any,
                 batch_sizes: tuple[int, ...], window_ms: float) -> tuple[Any, Any]:
  from t5train import batching, serving  # pylint: disable=g-import-not-at-top
  config = batching.BatchingConfig(batch_sizes=batch_sizes, window_ms=window_ms,
                                   input_lengths=(INPUT_LENGTH,),
                                   target_lengths=(_NEW_TOKENS.value,), warmup=('greedy',),
                                   max_queue_rows=1024)
  batcher = batching.Batcher(model, partitioner, params, shardings, config)
  started = time.perf_counter()
  batcher.warm_up()
  print(f'compiled {batch_sizes} in {time.perf_counter() - started:.1f} s', flush=True)
  return serving.create_app(batcher, serving.RequestLimits()), batcher


def _transformers_app(hf_dir: str, vocabulary: Any) -> Any:
  """transformers' generate behind the same HTTP stack, one request at a time."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
  lock = threading.Lock()

  def generate(text: str, new_tokens: int) -> tuple[str, int]:
    ids = list(vocabulary.encode(text))[:INPUT_LENGTH - 1] + [1]
    with lock, torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                           num_beams=1)[0].tolist()[1:]  # less the decoder start token
    kept = out[:out.index(1)] if 1 in out else [t for t in out if t]
    return vocabulary.decode(kept), min(len(kept) + (1 in out), new_tokens)

  async def predict(request: Any) -> JSONResponse:
    body = await request.json()
    new_tokens = body.get('decoding', {}).get('max_new_tokens', _NEW_TOKENS.value)
    text, length = await asyncio.to_thread(generate, body['inputs'][0], new_tokens)
    return JSONResponse({'predictions': [{'output': text, 'num_output_tokens': length}]})

  return Starlette(routes=[Route('/v1/predict', predict, methods=['POST'])])


def main(argv: list[str]) -> None:
  del argv
  from t5train import checkpoints, convert, inference, partitioning  # pylint: disable=g-import-not-at-top
  texts = sentences()
  model, config = _small_model()
  partitioner = partitioning.PjitPartitioner()
  initializer = inference.params_initializer(model, partitioner, 1, {
      'inputs': INPUT_LENGTH, 'targets': _NEW_TOKENS.value})
  params = initializer.from_scratch(jax.random.PRNGKey(0)).params
  shardings = initializer.train_state_shardings.params
  rows = []
  servers = [(f'sweep {setting}', *_setting(setting)) for setting in _SWEEP.value] or [
      ('t5train dynamic batching', BATCH_SIZES, WINDOW_MS),
      ('t5train naive (one request at a time)', (1,), 0.0)]
  for name, sizes, window in servers:
    asgi_app, batcher = _t5train_app(model, params, shardings, partitioner, sizes, window)
    rows += _drive(name, asgi_app, texts)
    batcher.close(60)
  if _SWEEP.value:
    _print_sweep(rows)
    return
  if _PEER.value:
    try:
      import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      print('transformers is not installed: no peer rows', flush=True)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoints.save_params(os.path.join(tmp, 'run'), jax.device_get(params))
        convert.export_hf(checkpoint, config, os.path.join(tmp, 'hf'))
        rows += _drive('transformers generate (one request at a time)',
                       _transformers_app(os.path.join(tmp, 'hf'), model.output_vocabulary), texts)
  summary = _summary(rows)
  print(json.dumps(summary, indent=1), flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump({'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                           'processor': platform.processor()},
               'model': 'T5 1.1 small, random weights, float32, byte vocabulary',
               'max_new_tokens': _NEW_TOKENS.value, 'input_length': INPUT_LENGTH,
               'batch_sizes': BATCH_SIZES, 'window_ms': WINDOW_MS, 'secs_per_level': _SECS.value,
               'rows': rows, 'summary': summary}, f, indent=1)


def _setting(text: str) -> tuple[tuple[int, ...], float]:
  """'1/8/32@5' -> ((1, 8, 32), 5.0)."""
  sizes, _, window = text.partition('@')
  return tuple(int(size) for size in sizes.split('/')), float(window or WINDOW_MS)


def _print_sweep(rows: list[dict[str, Any]]) -> None:
  print(f'{"setting":<22} {"clients":>7} {"requests/s":>10} {"p50 s":>7} {"p99 s":>7}')
  for row in rows:
    print(f'{row["system"].removeprefix("sweep "):<22} {row["clients"]:>7} '
          f'{row["requests_per_sec"]:>10.2f} {row["latency_p50_secs"] or 0:>7.2f} '
          f'{row["latency_p99_secs"] or 0:>7.2f}')


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """At the most clients: dynamic / naive requests/s, and p99 against a lone request + window."""
  by = {(r['system'].split(' (')[0], r['clients']): r for r in rows}
  most = max(r['clients'] for r in rows)
  dynamic, naive = by.get(('t5train dynamic batching', most)), by.get(('t5train naive', most))
  lone = by.get(('t5train dynamic batching', 1))
  out: dict[str, Any] = {'clients': most}
  if dynamic and naive and naive['requests_per_sec']:
    out['dynamic_over_naive_requests_per_sec'] = round(
        dynamic['requests_per_sec'] / naive['requests_per_sec'], 2)
  if dynamic and lone and lone['latency_p50_secs']:
    bound = 2 * lone['latency_p50_secs'] + WINDOW_MS / 1000
    out['p99_secs'] = dynamic['latency_p99_secs']
    out['p99_bound_secs (2 x lone p50 + window)'] = round(bound, 3)
  peer = by.get(('transformers generate', most))
  if dynamic and peer and peer['requests_per_sec']:
    out['dynamic_over_transformers_requests_per_sec'] = round(
        dynamic['requests_per_sec'] / peer['requests_per_sec'], 2)
  return out


if __name__ == '__main__':
  app.run(main)
