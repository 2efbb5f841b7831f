"""``python -m MODULE ARGS`` for the tests, without paying each process's imports again.

A binary's process spends about 5 of its first seconds importing TensorFlow, JAX, Flax, Orbax
and seqio. This file, run as a program, is a server that imports those libraries once and then
runs each requested ``python -m MODULE ARGS`` in a fork of itself: the child changes to the
requested directory and environment, sends its output to files and runs the module as
``__main__`` (``runpy``, as ``python -m`` does), so it starts as a fresh process of the binary
would after its imports. The libraries' state is the state of a process that has only imported
them: no JAX backend, no TensorFlow runtime, no parsed flags.

``Launcher`` (used by tests/binaries.py) starts the server in the background on first use and
returns ``subprocess.CompletedProcess`` objects, as ``subprocess.run`` would. A launch whose
environment differs from the server's in what the libraries read when imported (``JAX_*``,
``TF_*``, ``PYTHON*``) runs as a real subprocess instead, as every launch does with
``T5TRAIN_TESTS_FORK=0``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence

# Read by the libraries when they are imported: a child cannot change them after the fact.
IMPORT_TIME_PREFIXES = ('JAX_', 'TF_', 'PYTHON')
PRELOADED = ('t5train', 'tensorflow', 'jax', 'jax.numpy', 'flax.linen', 'optax', 'orbax.checkpoint',
             'seqio', 'gin', 'absl.app', 'absl.flags', 'absl.logging', 'numpy')


def _run_child(request: dict) -> None:
  """In the fork: become ``python -m MODULE ARGS`` in the request's directory and environment.
  Ends by raising SystemExit, so the interpreter exits as the binary's own process would."""
  import runpy  # noqa: PLC0415
  os.setpgid(0, 0)  # a group of its own, so a timeout stops its children too
  for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY),
                         (2, request['stderr'], os.O_WRONLY)):
    target = os.open(path, mode)
    os.dup2(target, fd)
    os.close(target)
  os.chdir(request['cwd'])
  os.environ.clear()
  os.environ.update(request['env'])
  sys.path[0] = os.getcwd()  # as ``python -m`` has it
  sys.argv = [request['module'], *request['args']]
  try:
    runpy.run_module(request['module'], run_name='__main__', alter_sys=True)
  except SystemExit:
    raise
  except BaseException:  # noqa: BLE001  (printed and exit status 1, as the interpreter does)
    import traceback  # noqa: PLC0415
    traceback.print_exc()
    raise SystemExit(1) from None
  raise SystemExit(0)


def serve() -> None:
  """The server: one request per line on stdin, answered with the child's pid and then its
  exit status (negative: the signal that ended it), one JSON line each on stdout."""
  for name in PRELOADED:
    __import__(name)
  protocol = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a stray print must not break the protocol
  protocol.write('ready\n')
  for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      protocol.close()
      _run_child(request)
    protocol.write(json.dumps({'pid': pid}) + '\n')
    _, status = os.waitpid(pid, 0)
    protocol.write(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}) + '\n')


class Launcher:
  """Runs ``python -m`` launches through one forking server per test process."""

  def __init__(self) -> None:
    self._server: subprocess.Popen | None = None
    self._env: dict[str, str] = {}
    self._lock = threading.Lock()

  def _start(self, env: Mapping[str, str]) -> None:
    self._env = dict(env)
    self._server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)], env=self._env, text=True, bufsize=1,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if self._server.stdout.readline().strip() != 'ready':
      raise RuntimeError('the launch server did not start')

  def _forkable(self, env: Mapping[str, str]) -> bool:
    if os.environ.get('T5TRAIN_TESTS_FORK', '1') == '0':
      return False
    if self._server is None or self._server.poll() is not None:
      self._start({key: value for key, value in env.items()})
    keys = {key for key in (*env, *self._env) if key.startswith(IMPORT_TIME_PREFIXES)}
    return all(env.get(key) == self._env.get(key) for key in keys)

  def run(self, module: str, args: Sequence[str], cwd: str, env: Mapping[str, str],
          timeout: float) -> subprocess.CompletedProcess:
    """What ``subprocess.run([python, '-m', module, *args], capture_output=True, text=True)``
    returns, from a fork of the server where the environment allows."""
    with self._lock:
      if not self._forkable(env):
        return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=dict(env),
                              capture_output=True, text=True, timeout=timeout)
      with tempfile.TemporaryDirectory() as tmp:
        request = {'module': module, 'args': list(args), 'cwd': os.path.abspath(cwd),
                   'env': dict(env), 'stdout': os.path.join(tmp, 'out'),
                   'stderr': os.path.join(tmp, 'err')}
        for name in ('stdout', 'stderr'):
          open(request[name], 'w').close()
        self._server.stdin.write(json.dumps(request) + '\n')
        pid = json.loads(self._server.stdout.readline())['pid']
        timed_out = threading.Event()

        def stop() -> None:
          timed_out.set()
          os.killpg(pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        returncode = json.loads(self._server.stdout.readline())['returncode']
        timer.cancel()
        if timed_out.is_set():
          raise subprocess.TimeoutExpired([module, *args], timeout)
        with open(request['stdout']) as out, open(request['stderr']) as err:
          return subprocess.CompletedProcess([sys.executable, '-m', module, *args], returncode,
                                             out.read(), err.read())


if __name__ == '__main__':
  serve()
