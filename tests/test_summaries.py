"""TensorBoard scalars and texts (written without TensorFlow in local folders, read back by
TensorBoard), and the definitions of the training metrics they hold."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from t5train import metrics, summaries
from t5train.t5x_compat import gin_utils as t5x_gin_utils


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
          'w.write_texts(1, {"config": "x = 1"}); w.close()\nprint("tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == 'False'
  assert summaries.read_scalars(str(tmp_path)) == {'loss': [(1, 1.0)]}
  assert summaries.read_texts(str(tmp_path)) == {'config': [(1, 'x = 1')]}


def test_t5x_training_metrics_are_t5x_definitions():
  """T5X's compute_base_metrics: sums over the steps of a summary, divided as T5X divides them."""
  from t5train import models
  step_sums = [  # two steps of a batch of 2 rows x 4 target positions
      {'loss': 6.0, 'z_loss': 1.0, 'per_token_cross_ent_sum': 4.0, 'num_correct': 3.0,
       'num_tokens': 6.0, 'num_positions': 8.0},
      {'loss': 2.0, 'z_loss': 0.0, 'per_token_cross_ent_sum': 2.0, 'num_correct': 1.0,
       'num_tokens': 2.0, 'num_positions': 8.0}]
  steps = [models.BaseTransformerModel.metrics({k: np.float32(v) for k, v in sums.items()})
           for sums in step_sums]
  merged = {name: steps[0][name].merge(steps[1][name]) for name in steps[0]}
  values = {name: float(metric.compute()) for name, metric in merged.items()}
  assert values == {
      'loss': 4.0,  # per step
      'cross_ent_loss': 3.5,
      'z_loss': 0.5,
      'loss_per_all_target_tokens': 8.0 / 16,  # per target position, padding included
      'loss_per_nonpadding_target_token': 8.0 / 8,
      'cross_ent_loss_per_all_target_tokens': 7.0 / 16,
      'z_loss_per_all_target_tokens': 1.0 / 16,
      'cross_ent_per_nonpadding_target_token': 6.0 / 8,  # t5train's: per real target token
      'accuracy': 4.0 / 8,
      'non_padding_fraction/loss_weights': 8.0 / 16}


def test_packing_metrics_count_examples_as_t5x_does():
  from t5train import models
  segments = np.array([[1, 1, 3, 3, 0, 0], [2, 2, 2, 2, 2, 2], [2, 7, 7, 7, 7, 0]])  # T5X's example
  assert int(models.count_packed_examples(segments)) == 5
  packed = {'encoder_segment_ids': segments, 'decoder_segment_ids': segments[:, :2],
            'decoder_target_tokens': np.ones((3, 4), np.int32)}
  sums = models._packing_sums(packed)
  zeros = dict.fromkeys(('loss', 'z_loss', 'per_token_cross_ent_sum', 'num_correct',
                         'num_tokens', 'num_positions'), np.float32(1))
  values = {name: float(metric.compute())
            for name, metric in models.BaseTransformerModel.metrics(zeros | sums).items()}
  assert values['effective_batch_size/encoder'] == 5
  assert values['effective_batch_size/decoder'] == 4  # [1 1], [2 2], [2 7]
  assert values['non_padding_fraction/encoder'] == pytest.approx(15 / 18)
  assert values['non_padding_fraction/decoder'] == 1.0
  assert values['non_padding_fraction/overall'] == pytest.approx(21 / 24)
  unpacked = {'encoder_input_tokens': np.array([[5, 6, 0], [0, 0, 0]]),
              'decoder_target_tokens': np.array([[4, 4], [9, 0]])}
  values = {name: float(metric.compute())
            for name, metric in models.BaseTransformerModel.metrics(
                zeros | models._packing_sums(unpacked)).items()}
  assert values['effective_batch_size/encoder_input_tokens'] == 1  # the empty row is no example
  assert values['effective_batch_size/decoder_target_tokens'] == 2
  assert values['non_padding_fraction/encoder_input_tokens'] == pytest.approx(2 / 6)


def test_timing_rates_are_t5x_definitions():
  timing = metrics.timing_scalars(num_steps=4, seconds=2.0, seqs_per_step=8,
                                  target_tokens_per_step=80)
  cores = jax.device_count()
  assert timing == {'timing/seconds': 2.0, 'timing/seqs': 32.0, 'timing/steps_per_second': 2.0,
                    'timing/seqs_per_second': 16.0, 'timing/seqs_per_second_per_core': 16 / cores,
                    'timing/target_tokens_per_second': 160.0,
                    'timing/target_tokens_per_second_per_core': 160 / cores}


def test_gin_config_is_written_as_a_text_summary(tmp_path):
  import gin

  @gin.configurable
  def configured(value=1):
    return value

  with gin.unlock_config():
    gin.parse_config('configured.value = 7')
  configured()
  writer = metrics.SummaryWriter(str(tmp_path / 'train'))
  writer.write_scalars(2, {'loss': 1.0})
  summaries.summarize_gin_config(str(tmp_path), writer, step=2)
  compat_dir = tmp_path / 'compat'
  t5x_gin_utils.summarize_gin_config(str(compat_dir))  # T5X's name; no writer: config.gin only
  writer.close()
  config = (tmp_path / 'config.gin').read_text()
  assert 'configured.value = 7' in config
  assert (compat_dir / 'config.gin').read_text() == config
  texts = summaries.read_texts(str(tmp_path / 'train'))
  assert list(texts) == ['config'] and texts['config'][0][0] == 2
  assert texts['config'][0][1] == gin.markdown(config)
  assert summaries.read_scalars(str(tmp_path / 'train')) == {'loss': [(2, 1.0)]}  # texts left out
