"""TensorBoard scalars: written without TensorFlow in local folders, read back by TensorBoard."""

import subprocess
import sys

from t5train import metrics, summaries


def test_scalars_round_trip_through_tensorboard(tmp_path):
  writer = metrics.SummaryWriter(str(tmp_path / 'train'))
  writer.write_scalars(1, {'loss': 2.5, 'accuracy': 0.25})
  writer.write_scalars(3, {'loss': 2.0})
  writer.close()
  assert summaries.read_scalars(str(tmp_path / 'train')) == {
      'loss': [(1, 2.5), (3, 2.0)], 'accuracy': [(1, 0.25)]}


def test_writing_scalars_locally_does_not_load_tensorflow(tmp_path):
  """TensorFlow costs a process about 0.55 GiB; a notebook that trains from Python without seqio
  data must not pay it for TensorBoard."""
  code = ('import sys\nfrom t5train import metrics\n'
          f'w = metrics.SummaryWriter({str(tmp_path)!r}); w.write_scalars(1, {{"loss": 1.0}}); '
          'w.close()\nprint("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == 'False'
  assert summaries.read_scalars(str(tmp_path)) == {'loss': [(1, 1.0)]}
