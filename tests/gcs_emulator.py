"""A local stand-in for Google Cloud Storage that every gs:// client of t5train reaches.

    with gcs_emulator.serve('bucket') as env:   # the variables that point the clients at it
      subprocess.run([...], env={**os.environ, **env})

gcp-storage-emulator serves the JSON API on 127.0.0.1. TensorStore (Orbax's arrays) and
google-cloud-storage (Orbax's bucket check) take its address from the environment. TensorFlow's
tf.io.gfile (etils.epath, summaries, the data iterator) cannot be pointed elsewhere: its
gcs_file_system.cc has https://www.googleapis.com and https://storage.googleapis.com built in. It
does honour HTTPS_PROXY and CURL_CA_BUNDLE, so a local proxy accepts its CONNECT, answers TLS with
a certificate from a throwaway CA (made by the openssl CLI) and forwards the requests to the
emulator. Nothing leaves the machine.

Both servers run in a child process (this file as a script). In the test process their Python
threads would deadlock with TensorFlow, which does some GCS I/O while holding the GIL (a GFile
closed by its destructor). The child exits when its standard input closes: when the parent
stops it, and when the parent dies.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http import HTTPStatus

# Hop-by-hop and framing headers: the proxy sets its own when it forwards a request.
_NOT_FORWARDED = {'host', 'connection', 'proxy-connection', 'keep-alive', 'transfer-encoding',
                  'te', 'trailer', 'upgrade', 'proxy-authorization', 'content-length', 'expect'}


@contextlib.contextmanager
def serve(bucket: str) -> Iterator[dict[str, str]]:
  """Runs the emulator with an empty ``bucket``; yields the environment variables for its clients.

  They take effect in processes started with them, and in this one if set in os.environ before
  its first gs:// access.
  """
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__), bucket],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    line = child.stdout.readline()  # written once both servers listen
    if not line:
      raise RuntimeError(f'the GCS emulator did not start (exit status {child.wait()})')
    yield json.loads(line)
  finally:
    child.stdout.close()
    child.stdin.close()
    try:
      child.wait(timeout=10)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()


def _make_certificate(directory: str) -> tuple[str, str, str]:
  """A CA, and a certificate it signs for Google's storage hosts: (CA file, cert file, key file)."""
  ca_key, ca, key, request, cert, extensions = (
      os.path.join(directory, name) for name in ('ca.key', 'ca.pem', 'leaf.key', 'leaf.csr',
                                                 'leaf.pem', 'leaf.cnf'))
  with open(extensions, 'w') as f:
    f.write('subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com\n'
            'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n')
  for command in (
      ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=t5train test CA',
       '-keyout', ca_key, '-out', ca, '-addext', 'basicConstraints=critical,CA:TRUE',
       '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
      ['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=www.googleapis.com', '-keyout', key,
       '-out', request],
      ['x509', '-req', '-in', request, '-CA', ca, '-CAkey', ca_key, '-CAcreateserial', '-days', '2',
       '-extfile', extensions, '-out', cert]):
    subprocess.run(['openssl', *command], check=True, capture_output=True)
  return ca, cert, key


class _Proxy(http.server.BaseHTTPRequestHandler):
  """An HTTPS proxy that decrypts what it tunnels and sends it to the emulator as plain HTTP."""

  protocol_version = 'HTTP/1.1'
  tls: ssl.SSLContext  # set on the subclass that serve_in_child makes
  emulator: tuple[str, int]

  def log_message(self, format: str, *args: object) -> None:
    pass

  def do_CONNECT(self) -> None:
    """Answers the tunnel request, then reads the client's requests from inside TLS."""
    self.send_response(HTTPStatus.OK, 'Connection Established')
    self.end_headers()
    self.connection = self.tls.wrap_socket(self.connection, server_side=True)
    self.rfile = self.connection.makefile('rb', -1)
    self.wfile = socketserver._SocketWriter(self.connection)
    self.close_connection = False

  def _read_body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() != 'chunked':
      return self.rfile.read(int(self.headers.get('Content-Length') or 0))
    body = bytearray()
    while size := int(self.rfile.readline().split(b';')[0], 16):
      body += self.rfile.read(size)
      self.rfile.readline()
    while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers
      pass
    return bytes(body)

  def _forward(self) -> None:
    body = self._read_body()
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
    host, port = self.emulator
    # The emulator builds URLs (a resumable upload's Location) from Host.
    headers['Host'] = f'{host}:{port}'
    headers['Content-Length'] = str(len(body))
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      data = response.read()
    finally:
      connection.close()
    self.send_response(response.status, response.reason)
    for k, v in response.getheaders():
      if k.lower() == 'location':
        # A resumable upload's URL. Kept on the proxy, which unwraps the chunked body of
        # TensorFlow's PUT; the emulator would store the chunk framing as data.
        v = v.replace(f'http://{host}:{port}', 'https://www.googleapis.com')
      if k.lower() not in _NOT_FORWARDED:
        self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_PUT = do_POST = do_DELETE = _forward


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True


def _patch_emulator() -> None:
  """Fixes four behaviours of gcp-storage-emulator that GCS clients rely on.

  1. A zero-byte upload (tf.io.gfile's makedirs writes 'dir/' objects) crashes the handler.
  2. Listing ignores startOffset/endOffset; TensorStore lists with them only, so its delete of a
     key range would delete the whole bucket.
  3. Downloads lack x-goog-generation; TensorStore then fails with 'Malformed StorageGeneration'.
  4. ifGenerationMatch / ifGenerationNotMatch are ignored; TensorStore's atomic writes and
     tf.io.gfile's makedirs rely on the 412 and 304 answers.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects

  read_data = server._read_data

  def read_data_or_empty(handler, query):
    data = read_data(handler, query)
    return b'' if data is None and handler.command in ('POST', 'PUT') else data

  server._read_data = read_data_or_empty

  def generation(storage, bucket, name):
    try:
      return int(storage.get_file_obj(bucket, name)['generation'])
    except NotFound:
      return None

  def preconditions_hold(request, response, storage, bucket, name):
    current = generation(storage, bucket, name)
    if 'ifGenerationMatch' in request.query:
      wanted = int(request.query['ifGenerationMatch'][0])
      if current != (wanted or None):  # 0: the object must not exist
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return False
    if 'ifGenerationNotMatch' in request.query:
      if current is not None and current == int(request.query['ifGenerationNotMatch'][0]):
        response.status = HTTPStatus.NOT_MODIFIED
        return False
    return True

  def conditional(handler, with_generation=False):
    def handle(request, response, storage, *args, **kwargs):
      bucket, name = request.params['bucket_name'], request.params['object_id']
      if not preconditions_hold(request, response, storage, bucket, name):
        return
      handler(request, response, storage, *args, **kwargs)
      if with_generation and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        response['x-goog-generation'] = str(generation(storage, bucket, name))
    return handle

  def insert(request, response, storage, *args, **kwargs):
    name = request.query.get('name')
    if 'upload_id' in request.query or not name or preconditions_hold(
        request, response, storage, request.params['bucket_name'], name[0]):
      original['insert'](request, response, storage, *args, **kwargs)

  def ls(request, response, storage, *args, **kwargs):
    original['ls'](request, response, storage, *args, **kwargs)
    start, end = (request.query.get(key, [None])[0] for key in ('startOffset', 'endOffset'))
    if response.status != HTTPStatus.OK or (start is None and end is None):
      return
    listing = json.loads(response._content)
    in_range = lambda name: (start is None or name >= start) and (end is None or name < end)
    listing['items'] = [item for item in listing['items'] if in_range(item['name'])]
    listing['prefixes'] = [p for p in listing['prefixes'] if in_range(p) or (start or '').startswith(p)]
    response.json(listing)

  original = {'insert': objects.insert, 'ls': objects.ls}
  replacements = {objects.insert: insert, objects.ls: ls,
                  objects.download: conditional(objects.download, with_generation=True),
                  objects.get: conditional(objects.get), objects.delete: conditional(objects.delete)}
  for _, handlers in server.HANDLERS:
    for method, handler in handlers.items():
      handlers[method] = replacements.get(handler, handler)
  # objects.get calls download (alt=media), and the router falls back on objects.insert.
  objects.download = replacements[objects.download]
  objects.insert = insert


def serve_in_child(bucket: str) -> None:
  """The child process: starts both servers, prints their variables, serves until stdin closes."""
  import logging

  from gcp_storage_emulator.handlers.buckets import create_bucket
  from gcp_storage_emulator.server import create_server

  logging.getLogger('gcp_storage_emulator').setLevel(logging.WARNING)
  logging.getLogger('gcp_storage_emulator.storage').setLevel(logging.CRITICAL)  # each 404 as an error
  _patch_emulator()
  emulator = create_server('127.0.0.1', 0, in_memory=True)
  create_bucket(bucket, emulator._storage)
  emulator.start()
  port = emulator._api._httpd.server_address[1]

  with tempfile.TemporaryDirectory(prefix='gcs_emulator_') as directory:
    ca, cert, key = _make_certificate(directory)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = type('Proxy', (_Proxy,), {'tls': tls, 'emulator': ('127.0.0.1', port)})
    proxy = _ThreadingServer(('127.0.0.1', 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url, proxy_url = f'http://127.0.0.1:{port}', f'http://127.0.0.1:{proxy.server_address[1]}'
    print(json.dumps({
        'TENSORSTORE_GCS_HTTP_URL': url,  # TensorStore
        'STORAGE_EMULATOR_HOST': url,  # google-cloud-storage
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy-token',  # TensorFlow and TensorStore: no ADC
        'NO_GCE_CHECK': 'true',  # google-auth: not on a GCE VM, ask no metadata server
        'HTTPS_PROXY': proxy_url, 'https_proxy': proxy_url,  # TensorFlow's libcurl
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': ca,  # TensorFlow trusts the proxy's certificate
    }), flush=True)
    sys.stdout.close()
    sys.stdin.read()  # returns when the parent closes the pipe or dies
    proxy.shutdown()
    emulator.stop()


if __name__ == '__main__':
  serve_in_child(sys.argv[1])
