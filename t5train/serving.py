"""The HTTP API of a served model: JSON requests in, text out, Prometheus metrics (Starlette).

Routes: ``POST /v1/predict``, ``POST /v1/score``, ``GET /v1/schema`` (the request schemas),
``GET /healthz`` (the process is up), ``GET /readyz`` (programs compiled), ``GET /metrics``.
Requests are checked here, before anything is queued: every mistake is a 4xx with a one-line
``{"error": ...}``, and nothing a client sends reaches the batcher unless it is valid. Decoding
and batching are the ``batching.Batcher``'s; this module does no JAX work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import prometheus_client
from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from t5train import batching

TOO_LONG = ('truncate', 'refuse')


@dataclasses.dataclass(frozen=True)
class RequestLimits:
  """What one request may ask. ``too_long``: 'truncate' an input (or target) longer than the
  longest length bucket to fit, and say so in the response (``input_truncated``), or 'refuse'
  the request (413)."""

  max_inputs_per_request: int = 32
  too_long: str = 'truncate'
  max_num_beams: int = 8
  max_body_bytes: int = 1 << 20
  retry_after_secs: int = 1

  def __post_init__(self) -> None:
    if self.too_long not in TOO_LONG:
      raise ValueError(f"RequestLimits.too_long must be 'truncate' or 'refuse', not "
                       f'{self.too_long!r}')


class BadRequest(Exception):
  """A request the server will not run: its HTTP status and a one-line reason."""

  def __init__(self, status: int, reason: str):
    super().__init__(reason)
    self.status = status


_STRINGS = {'type': 'array', 'items': {'type': 'string'}, 'minItems': 1}
DECODING_SCHEMA = {
    'type': 'object', 'additionalProperties': False,
    'properties': {
        'method': {'enum': list(batching.METHODS), 'default': 'greedy'},
        'max_new_tokens': {'type': 'integer', 'minimum': 1,
                           'description': 'at most the longest target length (the default)'},
        'temperature': {'type': 'number', 'exclusiveMinimum': 0, 'maximum': 100,
                        'description': "method 'sample' only; default 1"},
        'top_k': {'type': 'integer', 'minimum': 0,
                  'description': "method 'sample' only; 0 (default): the whole vocabulary"},
        'top_p': {'type': 'number', 'exclusiveMinimum': 0, 'maximum': 1,
                  'description': "method 'sample' only; 1 (default): off"},
        'num_beams': {'type': 'integer', 'minimum': 1,
                      'description': "method 'beam' only; default 4, at most max_num_beams"},
        'length_penalty': {'type': 'number', 'minimum': 0, 'maximum': 10,
                           'description': "method 'beam' only: alpha, default 0.6"},
    }}
SCHEMAS = {
    'predict': {'type': 'object', 'required': ['inputs'], 'additionalProperties': False,
                'properties': {'inputs': _STRINGS, 'decoding': DECODING_SCHEMA}},
    'score': {'type': 'object', 'required': ['inputs', 'targets'], 'additionalProperties': False,
              'properties': {'inputs': _STRINGS, 'targets': _STRINGS}},
}
# Which decoding fields each method takes, and the DecodingSettings field each sets.
_METHOD_FIELDS = {'greedy': {}, 'sample': {'temperature': 'temperature', 'top_k': 'top_k',
                                           'top_p': 'top_p'},
                  'beam': {'num_beams': 'num_beams', 'length_penalty': 'alpha'}}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_object(body: Any, kind: str) -> dict[str, Any]:
  schema = SCHEMAS[kind]
  if not isinstance(body, dict):
    raise BadRequest(400, 'the body must be a JSON object')
  for name in schema['required']:
    if name not in body:
      raise BadRequest(400, f'missing field {name!r}')
  unknown = sorted(set(body) - set(schema['properties']))
  if unknown:
    raise BadRequest(400, f'unknown field {unknown[0]!r}; known: '
                          f'{", ".join(schema["properties"])}')
  return body


def _strings(body: Mapping[str, Any], name: str, limits: RequestLimits) -> list[str]:
  values = body[name]
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise BadRequest(400, f'{name!r} must be a list of strings')
  if not values:
    raise BadRequest(400, f'{name!r} is empty')
  if len(values) > limits.max_inputs_per_request:
    raise BadRequest(413, f'{len(values)} {name} in one request; at most '
                          f'{limits.max_inputs_per_request}')
  for number, value in enumerate(values):
    try:
      value.encode('utf-8')
    except UnicodeEncodeError as e:  # JSON allows lone surrogates ("\ud800"); text does not
      raise BadRequest(400, f'{name}[{number}] is not valid Unicode: {e.reason} at character '
                            f'{e.start}') from None
  return values


def _in_range(name: str, value: Any, low: float, high: float, integer: bool,
              low_open: bool = False) -> float:
  if not (_is_int(value) if integer else _is_number(value)):
    raise BadRequest(400, f'decoding.{name} must be {"an integer" if integer else "a number"}')
  if value > high or value < low or (low_open and value == low):
    bounds = f'{"(" if low_open else "["}{low}, {high}]'
    raise BadRequest(400, f'decoding.{name} = {value} is outside {bounds}')
  return value


def parse_decoding(value: Any, limits: RequestLimits, max_target_length: int, vocab_size: int
                   ) -> tuple[batching.DecodingSettings, int]:
  """The decoding settings and the number of tokens to decode of a request's ``decoding``
  (an object; ``{}``, as when the field is left out, is greedy decoding of the longest target
  length)."""
  if not isinstance(value, dict):
    raise BadRequest(400, "'decoding' must be an object")
  method = value.get('method', 'greedy')
  if method not in batching.METHODS:
    raise BadRequest(400, f'unknown decoding method {method!r}; known: '
                          f'{", ".join(batching.METHODS)}')
  taken = {'method', 'max_new_tokens', *_METHOD_FIELDS[method]}
  for name in value:
    if name not in DECODING_SCHEMA['properties']:
      raise BadRequest(400, f'unknown decoding field {name!r}')
    if name not in taken:
      raise BadRequest(400, f'decoding.{name} does not apply to method {method!r}')
  max_new_tokens = int(_in_range('max_new_tokens', value.get('max_new_tokens', max_target_length),
                                 1, max_target_length, integer=True))
  fields: dict[str, Any] = {'method': method}
  if method == 'sample':
    fields['temperature'] = float(_in_range('temperature', value.get('temperature', 1.0), 0, 100,
                                            integer=False, low_open=True))
    fields['top_k'] = int(_in_range('top_k', value.get('top_k', 0), 0, vocab_size, integer=True))
    fields['top_p'] = float(_in_range('top_p', value.get('top_p', 1.0), 0, 1, integer=False,
                                      low_open=True))
  elif method == 'beam':
    fields['num_beams'] = int(_in_range('num_beams', value.get('num_beams', 4), 1,
                                        limits.max_num_beams, integer=True))
    fields['alpha'] = float(_in_range('length_penalty', value.get('length_penalty', 0.6), 0, 10,
                                      integer=False))
  return batching.DecodingSettings(**fields), max_new_tokens


class Tokenizer:
  """Text to token ids with EOS (trimmed as T5 tasks trim: ``max_length - 1`` ids, then EOS),
  and ids back to text, through the model's vocabularies."""

  def __init__(self, model: Any, limits: RequestLimits):
    self._model, self._limits = model, limits

  def encode(self, texts: Sequence[str], max_length: int, field: str, output: bool = False
             ) -> tuple[list[list[int]], list[bool]]:
    vocabulary = self._model.output_vocabulary if output else self._model.input_vocabulary
    eos = getattr(vocabulary, 'eos_id', 1)
    rows, truncated = [], []
    for number, text in enumerate(texts):
      if field == 'inputs' and not text.strip():
        raise BadRequest(400, f'inputs[{number}] is empty')
      ids = [int(i) for i in vocabulary.encode(text)]
      cut = len(ids) + 1 > max_length
      if cut and self._limits.too_long == 'refuse':
        raise BadRequest(413, f'{field}[{number}] has {len(ids) + 1} tokens with EOS; this server '
                              f"takes at most {max_length} (too_long='refuse')")
      rows.append(ids[:max_length - 1] + [eos])
      truncated.append(cut)
    return rows, truncated

  def decode(self, tokens: np.ndarray, limit: int) -> tuple[str, int]:
    """The text of decoded ids up to EOS (at most ``limit`` ids), and how many ids that is."""
    vocabulary = self._model.output_vocabulary
    ids = [int(t) for t in tokens[:limit]]
    eos = getattr(vocabulary, 'eos_id', 1)
    kept = ids[:ids.index(eos)] if eos in ids else [t for t in ids if t != 0]
    return vocabulary.decode(kept), min(len(kept) + (eos in ids), limit)


class Metrics:
  """The server's Prometheus metrics, in a registry of its own (one per app)."""

  def __init__(self, queued_rows: Callable[[], float]):
    self.registry = prometheus_client.CollectorRegistry()
    r = self.registry
    self.requests = prometheus_client.Counter(
        't5train_serve_requests', 'HTTP requests by route and status.', ['route', 'status'],
        registry=r)
    self.latency = prometheus_client.Histogram(
        't5train_serve_request_seconds', 'Request latency by route (successful requests).',
        ['route'], registry=r,
        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60))
    self.queue = prometheus_client.Gauge('t5train_serve_queue_rows', 'Rows waiting to run.',
                                         registry=r)
    self.queue.set_function(queued_rows)
    self.batch_rows = prometheus_client.Histogram(
        't5train_serve_batch_rows', 'Real rows per batch run.', ['kind'], registry=r,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.batch_seconds = prometheus_client.Histogram(
        't5train_serve_batch_seconds', 'Time to run one batch.', ['kind'], registry=r,
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.tokens = prometheus_client.Counter(
        't5train_serve_generated_tokens', 'Tokens generated (EOS included).', registry=r)
    self.tokens_per_second = prometheus_client.Gauge(
        't5train_serve_tokens_per_second', 'Tokens per second of the last predict batch.',
        registry=r)
    self.dropped = prometheus_client.Counter(
        't5train_serve_dropped_rows', 'Queued rows dropped: their client went away.', registry=r)

  def batch_done(self, kind: str, rows: int, batch_size: int, seconds: float,
                 generated_tokens: int) -> None:
    del batch_size
    self.batch_rows.labels(kind).observe(rows)
    self.batch_seconds.labels(kind).observe(seconds)
    if kind == 'predict':
      self.tokens.inc(generated_tokens)
      self.tokens_per_second.set(generated_tokens / max(seconds, 1e-9))

  def rows_dropped(self, rows: int) -> None:
    self.dropped.inc(rows)


def error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
  return JSONResponse({'error': reason}, status_code=status, headers=dict(headers or {}))


async def _read_json(request: Request, max_bytes: int) -> Any:
  body = bytearray()
  async for chunk in request.stream():
    body.extend(chunk)
    if len(body) > max_bytes:
      raise BadRequest(413, f'the body is over {max_bytes} bytes')
  try:
    return json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRequest(400, f'malformed JSON: {e}') from None


async def _client_gone(request: Request) -> None:
  """Returns when the client disconnects (the body has been read already)."""
  while (await request.receive())['type'] != 'http.disconnect':
    pass


async def _results(request: Request, ticket: batching.Ticket) -> list[Any] | None:
  """The ticket's results, or None (and the ticket cancelled) if the client went away first."""
  results = asyncio.wrap_future(ticket.future)
  gone = asyncio.ensure_future(_client_gone(request))
  done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
  if results in done:
    gone.cancel()
    return results.result()
  ticket.cancel()
  return None


def create_app(batcher: batching.Batcher, limits: RequestLimits,
               model_name: str = 'model', on_shutdown: Callable[[], None] | None = None
               ) -> Starlette:
  """The Starlette app serving ``batcher``'s model. ``on_shutdown`` runs after the last
  response (e.g. ``batcher.close``)."""
  model = batcher.model
  tokenizer = Tokenizer(model, limits)
  metrics = Metrics(lambda: batcher.queued_rows)
  batcher.observer = metrics  # the batcher reports its batches to these metrics
  vocab_size = int(getattr(model.output_vocabulary, 'vocab_size', 1 << 30))

  async def run(request: Request, route: str, handle: Callable[[Request, Any], Any]) -> Response:
    started = time.perf_counter()
    try:
      if not batcher.ready:
        raise BadRequest(503, 'the model is still compiling; see /readyz')
      response = await handle(request, await _read_json(request, limits.max_body_bytes))
    except BadRequest as e:
      headers = {'Retry-After': str(limits.retry_after_secs)} if e.status == 503 else None
      response = error(e.status, str(e), headers)
    except batching.QueueFull as e:
      response = error(503, f'{e}; retry later',
                       {'Retry-After': str(limits.retry_after_secs)})
    except batching.ShuttingDown as e:
      response = error(503, str(e))
    except Exception as e:  # pylint: disable=broad-except  (a failed batch fails its requests only)
      logging.exception('%s request failed.', route)
      reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
      response = error(500, f'internal error: {reason}')
    if response.status_code == 200:
      metrics.latency.labels(route).observe(time.perf_counter() - started)
    metrics.requests.labels(route, str(response.status_code)).inc()
    return response

  async def predict_body(request: Request, body: Any) -> Response:
    body = _check_object(body, 'predict')
    texts = _strings(body, 'inputs', limits)
    settings, max_new_tokens = parse_decoding(body.get('decoding', {}), limits,
                                              batcher.max_target_length, vocab_size)
    ids, truncated = tokenizer.encode(texts, batcher.max_input_length, 'inputs')
    ticket = batcher.submit('predict', [batching.Row(i) for i in ids], settings, max_new_tokens)
    results = await _results(request, ticket)
    if results is None:
      return error(499, 'the client closed the request')
    rows = []
    for result, cut in zip(results, truncated):
      text, length = tokenizer.decode(result.tokens, max_new_tokens)
      rows.append({'output': text, 'score': result.score, 'num_output_tokens': length,
                   'input_truncated': cut})
    return JSONResponse({'predictions': rows, 'model': model_name})

  async def score_body(request: Request, body: Any) -> Response:
    body = _check_object(body, 'score')
    inputs, targets = _strings(body, 'inputs', limits), _strings(body, 'targets', limits)
    if len(inputs) != len(targets):
      raise BadRequest(400, f'{len(inputs)} inputs but {len(targets)} targets')
    input_ids, inputs_cut = tokenizer.encode(inputs, batcher.max_input_length, 'inputs')
    target_ids, targets_cut = tokenizer.encode(targets, batcher.max_target_length, 'targets',
                                               output=True)
    ticket = batcher.submit('score', [batching.Row(i, t) for i, t in zip(input_ids, target_ids)])
    results = await _results(request, ticket)
    if results is None:
      return error(499, 'the client closed the request')
    return JSONResponse({'scores': [
        {'log_likelihood': score, 'input_truncated': a, 'target_truncated': b}
        for score, a, b in zip(results, inputs_cut, targets_cut)], 'model': model_name})

  async def predict(request: Request) -> Response:
    return await run(request, 'predict', predict_body)

  async def score(request: Request) -> Response:
    return await run(request, 'score', score_body)

  async def healthz(request: Request) -> Response:
    return JSONResponse({'status': 'ok'})

  async def readyz(request: Request) -> Response:
    if batcher.ready:
      return JSONResponse({'status': 'ready'})
    return error(503, 'compiling')

  async def schema(request: Request) -> Response:
    return JSONResponse({**SCHEMAS, 'limits': dataclasses.asdict(limits),
                         'max_input_length': batcher.max_input_length,
                         'max_target_length': batcher.max_target_length})

  async def prometheus(request: Request) -> Response:
    return Response(prometheus_client.generate_latest(metrics.registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)

  async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail)

  routes = [Route('/v1/predict', predict, methods=['POST']),
            Route('/v1/score', score, methods=['POST']),
            Route('/v1/schema', schema), Route('/healthz', healthz), Route('/readyz', readyz),
            Route('/metrics', prometheus)]

  @contextlib.asynccontextmanager
  async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    if on_shutdown is not None:
      await asyncio.to_thread(on_shutdown)

  app = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                  lifespan=lifespan)
  app.state.metrics = metrics
  return app
