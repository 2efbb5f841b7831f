"""The train binary refuses layouts that do not fit the 8 devices, before compiling anything."""

import pytest
from binaries import SMOKE, run_train


@pytest.mark.parametrize('binding,message', [
    ('--gin.partitioning.PjitPartitioner.num_partitions=3',
     'the number of devices (8) must be a multiple of the number of model partitions (3)'),
    ('--gin.BATCH_SIZE=12', 'BATCH_SIZE 12 is not divisible by the 8 data-parallel shards'),
], ids=['partitions_do_not_divide_devices', 'batch_does_not_divide_data_axis'])
def test_bad_layout_exits_2(tmp_path, binding, message):
  result = run_train(*SMOKE, f"--gin.MODEL_DIR='{tmp_path}'", '--gin.TRAIN_STEPS=2', binding)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('t5train.train: error:') and message in last, last
  assert 'Traceback' not in result.stderr
  assert 'Training steps' not in result.stderr
