"""The serve binary and its HTTP API: outputs equal infer's, bad requests get a 4xx while good
ones keep being answered, full queues answer 503, a client that goes away loses only its own
rows, SIGTERM finishes the request in flight and exits 0, an unreadable checkpoint exits 2.

One tiny run (1 training step) is served in this process by uvicorn on a free port; the binary
runs in a subprocess for the exit statuses.
"""

import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest
import uvicorn
from binaries import REPO, call_configured, run_binary

import gin
from t5train import batching, checkpoints, decoding, gin_utils, partitioning, serving
from t5train import infer as infer_script
from t5train import serve as serve_script
from t5train import train as train_script

INPUTS = ['8403', '12345678', '971', '5550123']
TARGETS = ['0348', '12345678', '179', '0012355']
LENGTH = 32  # the demo task's input and target lengths, and the server's only length bucket
BATCHING = batching.BatchingConfig(batch_sizes=(1, 4), window_ms=50, input_lengths=(LENGTH,),
                                   target_lengths=(LENGTH,), warmup=('greedy',))
LIMITS = serving.RequestLimits(max_inputs_per_request=4, too_long='refuse', max_num_beams=4)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('run'))
  call_configured(train_script.train, ['gin/models/t5_1_1/tiny.gin', 'gin/runs/pretrain.gin',
                                       'gin/tasks/demo.gin'],
                  [f"MODEL_DIR = '{path}'", 'TRAIN_STEPS = 1', 'BATCH_SIZE = 8',
                   'EVAL_PERIOD = 0'])
  return path


def _model_from_run(model_dir):
  """The run's model, as its config.gin builds it."""
  gin.clear_config()
  try:
    gin_utils.parse_gin([os.path.join(model_dir, 'config.gin')], [],
                        search_paths=[gin_utils.REPO_ROOT])
    return gin.config.parse_value('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()


class _Server:
  """uvicorn serving ``app`` from a thread, on a free port of 127.0.0.1."""

  def __init__(self, app):
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline and self.thread.is_alive(), 'uvicorn did not start'
      time.sleep(0.02)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f'http://127.0.0.1:{port}'

  def stop(self):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope='module')
def served(model_dir):
  model = _model_from_run(model_dir)
  batcher, step = serve_script.load_batcher(
      model, partitioning.PjitPartitioner(), checkpoints.RestoreCheckpointConfig(path=model_dir),
      BATCHING)
  assert step == 1 and batcher.ready
  server = _Server(serving.create_app(batcher, LIMITS))
  yield server.url, batcher
  server.stop()
  batcher.close(10)


@pytest.fixture(scope='module')
def infer_records(model_dir, tmp_path_factory):
  """What t5train.infer writes for INPUTS (predictions with scores, and target scores)."""
  directory = tmp_path_factory.mktemp('infer')
  examples = directory / 'examples.tsv'
  examples.write_text(''.join(f'{i}\t{t}\n' for i, t in zip(INPUTS, TARGETS)))
  records = {}
  for mode in ('predict_with_aux', 'score'):
    [path] = call_configured(
        infer_script.infer, ['gin/runs/infer.gin', os.path.join(model_dir, 'config.gin')],
        [f"CHECKPOINT_PATH = '{model_dir}'", f"INFER_OUTPUT_DIR = '{directory}'",
         f"INPUT_FILE = '{examples}'", f"TASK_FEATURE_LENGTHS = {{'inputs': {LENGTH}, "
         f"'targets': {LENGTH}}}", 'BATCH_SIZE = 4', f"infer_script.infer.mode = '{mode}'"])
    with open(path) as f:
      records[mode] = [json.loads(line) for line in f]
  return records


def _post(url, route, body, timeout=60):
  return httpx.post(f'{url}/v1/{route}', json=body, timeout=timeout)


def _metric(url, name):
  """The sum of a Prometheus metric's samples (over labels) from /metrics."""
  text = httpx.get(f'{url}/metrics').text
  return sum(float(line.rsplit(' ', 1)[1]) for line in text.splitlines()
             if line.startswith(name + ' ') or line.startswith(name + '{'))


def test_outputs_equal_infer_and_concurrent_requests_share_batches(served, infer_records):
  url, _ = served
  assert httpx.get(f'{url}/healthz').status_code == 200
  assert httpx.get(f'{url}/readyz').json() == {'status': 'ready'}
  batches_before = _metric(url, 't5train_serve_batch_rows_count')
  # One request per input, all at once: they arrive within the window and run together.
  with httpx.Client(timeout=60) as client:
    threads, responses = [], {}
    for number, text in enumerate(INPUTS):
      send = lambda n=number, t=text: responses.__setitem__(
          n, client.post(f'{url}/v1/predict', json={'inputs': [t]}))
      threads.append(threading.Thread(target=send))
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
  predictions = [responses[n].json()['predictions'][0] for n in range(len(INPUTS))]
  expected = infer_records['predict_with_aux']
  assert [p['output'] for p in predictions] == [r['prediction'] for r in expected]
  for prediction, record in zip(predictions, expected):
    assert prediction['score'] == pytest.approx(record['aux']['scores'], rel=1e-4, abs=1e-4)
    assert not prediction['input_truncated']
  assert _metric(url, 't5train_serve_batch_rows_count') - batches_before < len(INPUTS)
  scores = _post(url, 'score', {'inputs': INPUTS, 'targets': TARGETS}).json()['scores']
  assert [s['log_likelihood'] for s in scores] == pytest.approx(
      [r['score'] for r in infer_records['score']], rel=1e-4, abs=1e-4)
  assert _metric(url, 't5train_serve_generated_tokens_total') > 0
  assert _metric(url, 't5train_serve_requests_total') >= len(INPUTS) + 1


BEAM_GIN = """
from __gin__ import dynamic_registration
from t5train import decoding
from t5train import models

models.EncoderDecoderModel.decode_fn = @decoding.beam_search
decoding.beam_search.num_decodes = 2
decoding.beam_search.alpha = 0.6
"""


def test_sampling_and_beam_requests_decode_as_infer_does(served, model_dir, infer_records,
                                                         tmp_path):
  url, _ = served
  # Sampling from the single most likely token is greedy decoding.
  sampled = _post(url, 'predict', {'inputs': INPUTS, 'decoding': {
      'method': 'sample', 'temperature': 0.7, 'top_k': 1}}).json()['predictions']
  assert [p['output'] for p in sampled] == [
      r['prediction'] for r in infer_records['predict_with_aux']]
  beams = _post(url, 'predict', {'inputs': INPUTS, 'decoding': {
      'method': 'beam', 'num_beams': 2}}).json()['predictions']
  examples, beam_gin = tmp_path / 'examples.tsv', tmp_path / 'beam.gin'
  examples.write_text(''.join(f'{i}\t{t}\n' for i, t in zip(INPUTS, TARGETS)))
  beam_gin.write_text(BEAM_GIN)
  [path] = call_configured(
      infer_script.infer, ['gin/runs/infer.gin', os.path.join(model_dir, 'config.gin'), beam_gin],
      [f"CHECKPOINT_PATH = '{model_dir}'", f"INFER_OUTPUT_DIR = '{tmp_path}'",
       f"INPUT_FILE = '{examples}'",
       f"TASK_FEATURE_LENGTHS = {{'inputs': {LENGTH}, 'targets': {LENGTH}}}", 'BATCH_SIZE = 4',
       "infer_script.infer.mode = 'predict_with_aux'"])
  with open(path) as f:
    expected = [json.loads(line) for line in f]
  assert [p['output'] for p in beams] == [r['prediction'] for r in expected]
  for prediction, record in zip(beams, expected):
    assert prediction['score'] == pytest.approx(record['aux']['scores'], rel=1e-4, abs=1e-4)


def _reference_decode(batcher, texts, decode_fn, decoder_params, length):
  """The model's own decodes of ``texts`` (tokens, scores) at decode length ``length``."""
  model = copy.copy(batcher.model)
  model.decode_fn = decode_fn
  vocabulary = model.input_vocabulary
  rows = [[int(i) for i in vocabulary.encode(t)] + [vocabulary.eos_id] for t in texts]
  inputs = np.asarray([r + [0] * (LENGTH - len(r)) for r in rows], np.int32)
  tokens, aux = jax.jit(lambda params, batch: model.predict_batch_with_aux(
      params, batch, None, decoder_params, max_decode_length=length))(
          batcher._params, {'encoder_input_tokens': inputs})  # pylint: disable=protected-access
  return np.asarray(tokens), np.asarray(aux['scores'])


def test_max_new_tokens_stops_the_decode_and_scores_what_it_returns(served):
  url, batcher = served
  vocabulary = batcher.model.output_vocabulary
  full = _post(url, 'predict', {'inputs': INPUTS})
  assert full.status_code == 200, full.text
  full = full.json()['predictions']
  k = 3
  generated = _metric(url, 't5train_serve_generated_tokens_total')
  short = _post(url, 'predict', {'inputs': INPUTS, 'decoding': {'max_new_tokens': k}})
  assert short.status_code == 200, short.text
  short = short.json()['predictions']
  # Only the tokens returned were generated, and counted.
  assert _metric(url, 't5train_serve_generated_tokens_total') - generated == sum(
      p['num_output_tokens'] for p in short)
  tokens, scores = _reference_decode(batcher, INPUTS, decoding.temperature_sample,
                                     {'temperature': 0.0, 'num_decodes': 1}, k)
  for prediction, whole, ids, score in zip(short, full, tokens, scores):
    assert prediction['num_output_tokens'] <= k
    eos = vocabulary.eos_id
    kept = list(ids[:list(ids).index(eos)]) if eos in ids else [t for t in ids if t]
    assert prediction['output'] == vocabulary.decode([int(t) for t in kept])
    assert prediction['score'] == pytest.approx(float(score), rel=1e-4, abs=1e-4)
    if whole['num_output_tokens'] > k:  # cut short: a likelier (higher) score than the whole
      assert prediction['score'] > whole['score']
  assert any(whole['num_output_tokens'] > k for whole in full)
  # Beam search: the best k-token beams, with the length penalty of their own length.
  beams = _post(url, 'predict', {'inputs': INPUTS, 'decoding': {
      'method': 'beam', 'num_beams': 2, 'max_new_tokens': k}})
  assert beams.status_code == 200, beams.text
  tokens, scores = _reference_decode(batcher, INPUTS, decoding.beam_search,
                                     {'num_decodes': 2, 'alpha': 0.6}, k)
  for prediction, ids, score in zip(beams.json()['predictions'], tokens, scores):
    eos = vocabulary.eos_id
    kept = list(ids[:list(ids).index(eos)]) if eos in ids else [t for t in ids if t]
    assert prediction['output'] == vocabulary.decode([int(t) for t in kept])
    assert prediction['score'] == pytest.approx(float(score), rel=1e-4, abs=1e-4)


BAD_REQUESTS = [  # (body or raw bytes, status, words the reason must hold)
    (b'{"inputs": ["84"', 400, 'malformed JSON'),
    ([1, 2], 400, 'JSON object'),
    ({}, 400, "missing field 'inputs'"),
    ({'inputs': 'abc'}, 400, 'list of strings'),
    ({'inputs': [3]}, 400, 'list of strings'),
    ({'inputs': []}, 400, 'is empty'),
    ({'inputs': ['  ']}, 400, 'inputs[0] is empty'),
    ({'inputs': ['1'] * 5}, 413, 'at most 4'),
    ({'inputs': ['1' * 40]}, 413, "too_long='refuse'"),
    ({'inputs': ['1'], 'extra': 1}, 400, "unknown field 'extra'"),
    ({'inputs': ['1'], 'decoding': {'method': 'nucleus'}}, 400, 'unknown decoding method'),
    ({'inputs': ['1'], 'decoding': {'method': 'sample', 'temperature': -1}}, 400, 'outside'),
    ({'inputs': ['1'], 'decoding': {'method': 'beam', 'num_beams': 10 ** 9}}, 400, 'outside'),
    ({'inputs': ['1'], 'decoding': {'max_new_tokens': 0}}, 400, 'outside'),
    ({'inputs': ['1'], 'decoding': {'max_new_tokens': 2.5}}, 400, 'an integer'),
    ({'inputs': ['1'], 'decoding': {'temperature': 0.5}}, 400, "does not apply to method 'greedy'"),
    ({'inputs': ['1'], 'decoding': 'beam'}, 400, 'must be an object'),
    ({'inputs': ['1'], 'decoding': None}, 400, 'must be an object'),
    (b'{"inputs": ["1", "\\ud800"]}', 400, 'inputs[1] is not valid Unicode'),
]


def test_bad_requests_get_a_4xx_while_good_requests_keep_being_answered(served, infer_records):
  url, _ = served
  expected = infer_records['predict_with_aux'][0]['prediction']
  stop, answers, wrong = threading.Event(), [], []

  def steady_stream():
    with httpx.Client(timeout=60) as client:
      while not stop.is_set():
        response = client.post(f'{url}/v1/predict', json={'inputs': [INPUTS[0]]})
        output = response.json()['predictions'][0]['output'] if response.status_code == 200 else None
        (answers if output == expected else wrong).append(response.status_code)

  stream = threading.Thread(target=steady_stream)
  stream.start()
  try:
    for body, status, reason in BAD_REQUESTS:
      if isinstance(body, bytes):
        response = httpx.post(f'{url}/v1/predict', content=body, timeout=60)
      else:
        response = _post(url, 'predict', body)
      assert response.status_code == status, (body, response.text)
      message = response.json()['error']
      assert reason in message and '\n' not in message, (body, message)
    assert _post(url, 'score', {'inputs': ['1', '2'], 'targets': ['1']}).status_code == 400
    assert httpx.get(f'{url}/v1/predict').status_code == 405
    assert httpx.get(f'{url}/v2/predict').json() == {'error': 'Not Found'}
    time.sleep(0.3)
  finally:
    stop.set()
    stream.join(60)
  assert not wrong and len(answers) >= 3, (wrong, len(answers))


def test_a_full_queue_answers_503_with_retry_after(served):
  url, batcher = served
  config = batcher.config
  batcher.config = dataclasses.replace(config, max_queue_rows=2)
  try:
    response = _post(url, 'predict', {'inputs': ['1', '2', '3']})
    assert response.status_code == 503 and response.headers['Retry-After'] == '1'
    assert 'queue is full' in response.json()['error']
    assert _post(url, 'predict', {'inputs': ['1', '2']}).status_code == 200
  finally:
    batcher.config = config


def test_a_client_that_goes_away_loses_only_its_own_rows(served, infer_records):
  url, batcher = served
  config = batcher.config
  batcher.config = dataclasses.replace(config, window_ms=1000)
  dropped = _metric(url, 't5train_serve_dropped_rows_total')
  try:
    host, port = url.removeprefix('http://').split(':')
    body = json.dumps({'inputs': [INPUTS[1]]}).encode()
    with socket.create_connection((host, int(port))) as gone:  # sends, then hangs up
      gone.sendall(b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                   b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
      time.sleep(0.2)
    response = _post(url, 'predict', {'inputs': [INPUTS[2]]})
  finally:
    batcher.config = config
  assert response.json()['predictions'][0]['output'] == \
      infer_records['predict_with_aux'][2]['prediction']
  assert _metric(url, 't5train_serve_dropped_rows_total') == dropped + 1
  assert batcher.queued_rows == 0


def test_parse_decoding_and_truncation():
  limits = serving.RequestLimits(too_long='truncate')
  settings, tokens = serving.parse_decoding(
      {'method': 'sample', 'temperature': 0.5, 'top_p': 0.9, 'max_new_tokens': 7}, limits, 32, 100)
  assert settings == batching.DecodingSettings('sample', temperature=0.5, top_p=0.9)
  assert tokens == 7
  settings, tokens = serving.parse_decoding({'method': 'beam'}, limits, 32, 100)
  assert (settings.method, settings.num_beams, tokens) == ('beam', 4, 32)
  assert settings.decode_fn()[1] == {'num_decodes': 4, 'alpha': 0.6}

  class Model:
    input_vocabulary = output_vocabulary = type('V', (), {'eos_id': 1,
                                                          'encode': lambda self, t: [7] * len(t)})()
  ids, cut = serving.Tokenizer(Model(), limits).encode(['abc', 'a' * 10], 5, 'inputs')
  assert ids == [[7, 7, 7, 1], [7, 7, 7, 7, 1]] and cut == [False, True]


def _serve_command(model_dir, *bindings):
  return [sys.executable, '-m', 't5train.serve', f'--gin_file={model_dir}/config.gin',
          f"--gin.CHECKPOINT_PATH='{model_dir}'", '--port=0', *bindings]


def test_binary_finishes_the_request_in_flight_on_sigterm_and_exits_0(model_dir, infer_records):
  process = subprocess.Popen(
      _serve_command(model_dir, f'--gin.batching.BatchingConfig.input_lengths=({LENGTH},)',
                     '--gin.batching.BatchingConfig.batch_sizes=(1,)',
                     "--gin.batching.BatchingConfig.warmup=('greedy',)",
                     '--gin.batching.BatchingConfig.window_ms=1500'),
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    url = None
    for line in process.stdout:  # the log, until the line that names the port
      if 'listening on' in line:
        url = line.split('listening on ')[1].strip()
        break
    assert url, 'the server did not start'
    responses = []
    request = threading.Thread(target=lambda: responses.append(
        _post(url, 'predict', {'inputs': [INPUTS[3]]})))
    request.start()
    time.sleep(0.5)  # the request waits in its 1.5 s window
    process.send_signal(signal.SIGTERM)
    request.join(60)
    assert process.wait(60) == 0
  finally:
    if process.poll() is None:
      process.kill()
  assert responses[0].status_code == 200
  assert responses[0].json()['predictions'][0]['output'] == \
      infer_records['predict_with_aux'][3]['prediction']


def test_binary_exits_2_with_one_line_when_the_checkpoint_is_unreadable(model_dir, tmp_path):
  broken = tmp_path / 'checkpoint_1'
  broken.mkdir()
  (broken / 'state').write_text('not a checkpoint')
  result = run_binary('t5train.serve', f'--gin_file={model_dir}/config.gin',
                      f"--gin.CHECKPOINT_PATH='{broken}'")
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if 't5train.serve: error:' in line]
  assert len(errors) == 1 and str(broken) in errors[0], result.stderr[-2000:]
