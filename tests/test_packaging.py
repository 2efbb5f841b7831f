"""The wheel: built from the sources, installed (not editable) into a fresh virtual environment,
its console scripts train from any directory with the gin files that ship inside the package.

The fresh environment has no pip of its own and reaches the test environment's dependencies
through a ``.pth`` line (nothing is downloaded); the editable install of the checkout is not
visible there, because ``.pth`` files in a directory added by a ``.pth`` line are not processed.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from binaries import REPO


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """The wheel built from a copy of the sources (pip builds in the source tree)."""
  source = tmp_path_factory.mktemp('source')
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), source)
  for name in ('t5train', 'gin'):
    shutil.copytree(os.path.join(REPO, name), source / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  out = tmp_path_factory.mktemp('dist')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                  '--no-build-isolation', '--wheel-dir', str(out), str(source)],
                 check=True, capture_output=True, text=True, timeout=300)
  (path,) = glob.glob(str(out / 't5train-*.whl'))
  return path


def test_the_wheel_holds_every_gin_file_of_the_checkout(wheel):
  gin_dir = os.path.join(REPO, 'gin')
  expected = {os.path.relpath(path, gin_dir)
              for path in glob.glob(os.path.join(gin_dir, '**', '*.gin'), recursive=True)}
  with zipfile.ZipFile(wheel) as archive:
    shipped = {name.removeprefix('t5train/configs/') for name in archive.namelist()
               if name.startswith('t5train/configs/') and name.endswith('.gin')}
  assert expected and shipped == expected


def test_installed_console_script_trains_from_any_directory(wheel, tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = venv / 'bin' / 'python'
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                        check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, 'test_dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--quiet',
                  '--no-deps', '--no-index', wheel], check=True, capture_output=True, text=True)
  where = subprocess.run([python, '-c', 'import t5train; print(t5train.__file__)'], cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
  assert where.startswith(site), where  # the installed copy, not the checkout

  work = tmp_path / 'elsewhere'
  work.mkdir()
  model_dir = tmp_path / 'run'
  result = subprocess.run(
      [venv / 'bin' / 't5train-train', '--gin_file=models/t5_1_1/tiny.gin',
       '--gin_file=runs/pretrain.gin', '--gin_file=gin/tasks/demo.gin',  # a checkout's path too
       f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=20'],
      cwd=work, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(model_dir / 'checkpoint_20')
  assert os.path.isfile(model_dir / 'config.gin')

  missing = subprocess.run([venv / 'bin' / 't5train-train', '--gin_file=models/nope.gin'],
                           cwd=work, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and 't5train/configs' in missing.stderr
