"""A short run of every kind, decoded and evaluated through its own config.gin, the documented way:

    t5train.infer --gin_file=gin/runs/infer.gin --gin_file=MODEL_DIR/config.gin --gin.CHECKPOINT_PATH=...

A fine-tune's config.gin says how the run started (RestoreCheckpointConfig bound to
INITIAL_CHECKPOINT_PATH, an assignment map that leaves adapters fresh); that must not change which
checkpoint infer and eval read. The same runs check what LoRA checkpoints hold and how they decode
merged, and a decoder-only run's evaluation and serving with decoding and scoring. The binaries' entry points
are called in this process (gin parsed as the binaries parse it), so that each run and decode costs
its compilation, not a process start-up.
"""

import json
import math
import os

import numpy as np
import pytest
from binaries import call_configured

import gin
from t5train import (
  checkpoint_reading,
  convert,
  gin_report,
  gin_utils,
  interactive_model,
  partitioning,
)
from t5train import eval as eval_script
from t5train import infer as infer_script
from t5train import train as train_script

TINY = 'gin/models/t5_1_1/tiny.gin'
DECODER_ONLY_TINY = 'gin/models/decoder_only/tiny.gin'
RUN_KINDS = {  # kind: (model gin file, run gin file, fine-tuned from the pretrained run)
    'pretrain': (TINY, 'gin/runs/pretrain.gin', False),
    'finetune': (TINY, 'gin/runs/finetune.gin', True),
    'finetune_lora': (TINY, 'gin/runs/finetune_lora.gin', True),
    'finetune_prompt': (TINY, 'gin/runs/finetune_prompt.gin', True),
    'decoder_only': (DECODER_ONLY_TINY, 'gin/runs/pretrain.gin', False),
}
EXTRA_BINDINGS = {
    # A learning rate that moves the adapters well away from zero, so that they change decodes.
    'finetune_lora': ['optimizers.create_learning_rate_scheduler.base_learning_rate = 0.05'],
    # Teacher-forced and seqio (decoding and scoring) evaluation of a prefix LM during training.
    'decoder_only': ['train_script.train.infer_eval_dataset_cfg = @train_eval/data.DatasetConfig()',
                     'train_script.train.infer_eval_num_examples = 4'],
}
BEST = ['train_script.train.best_checkpoint_cfg = @best_checkpoint.BestCheckpointConfig()',
        "best_checkpoint.BestCheckpointConfig.metric = 'training_eval/sort_digits/loss'"]
LENGTHS = {'inputs': 32, 'targets': 32}  # gin/tasks/demo.gin's
NUM_EXAMPLES = 8


def _model(gin_files):
  """The MODEL the gin files bind, built as convert builds it."""
  gin.clear_config()
  try:
    return convert.gin_model(gin_files, search_paths=[gin_utils.REPO_ROOT])
  finally:
    gin.clear_config()


def _train(model_dir, kind, initial_checkpoint):
  model_file, run_file, _ = RUN_KINDS[kind]
  steps = 2
  bindings = [f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8', 'EVAL_PERIOD = 1', 'EVAL_STEPS = 1',
              'CHECKPOINT_PERIOD = 1', 'train_script.train.infer_eval_dataset_cfg = None', *BEST,
              *EXTRA_BINDINGS.get(kind, [])]
  if initial_checkpoint:
    bindings.append(f"INITIAL_CHECKPOINT_PATH = '{initial_checkpoint}'")
    steps += 2  # TRAIN_STEPS counts from the initial checkpoint's step
  bindings.append(f'TRAIN_STEPS = {steps}')
  call_configured(train_script.train, [model_file, run_file, 'gin/tasks/demo.gin'], bindings)
  return f'{model_dir}/checkpoint_{steps}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A short run of every kind, with checkpoints every step and MODEL_DIR/best."""
  root = tmp_path_factory.mktemp('run_kinds')
  pretrained = _train(root / 'pretrain', 'pretrain', None)
  made = {'pretrain': (str(root / 'pretrain'), pretrained)}
  for kind, (_, _, finetuned) in RUN_KINDS.items():
    if kind != 'pretrain':
      made[kind] = (str(root / kind), _train(root / kind, kind, pretrained if finetuned else None))
  return made


def _infer(model_dir, checkpoint, output_dir, mode='predict', num_examples=NUM_EXAMPLES):
  written = call_configured(infer_script.infer, ['gin/runs/infer.gin', f'{model_dir}/config.gin'],
                  [f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{output_dir}'",
                   f"infer_script.infer.mode = '{mode}'",
                   f'infer_script.infer.num_examples = {num_examples}'])
  with open(written[0]) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('kind', list(RUN_KINDS))
def test_a_run_decodes_and_evaluates_through_its_config_gin(runs, kind, tmp_path):
  model_dir, checkpoint = runs[kind]
  assert os.path.isdir(f'{model_dir}/best')
  records = _infer(model_dir, checkpoint, tmp_path / 'infer')
  assert len(records) == NUM_EXAMPLES and all('prediction' in r for r in records)

  results = call_configured(eval_script.evaluate, ['gin/runs/eval.gin', f'{model_dir}/config.gin'],
                  [f"CHECKPOINT_PATH = '{model_dir}/best'", f"EVAL_OUTPUT_DIR = '{tmp_path}/eval'",
                   'eval_script.evaluate.num_examples = 4'])
  with open(f'{model_dir}/best/best.json') as f:
    best_step = json.load(f)['step']
  assert list(results) == [str(best_step)]
  assert 'sort_digits' in results[str(best_step)]


def test_the_runs_start_settings_are_reported_not_applied(runs, tmp_path):
  """infer reads its own scoped RestoreCheckpointConfig; the unused-binding report names the
  config.gin's unscoped one (how the run started) and why it configures nothing."""
  model_dir, checkpoint = runs['finetune_lora']
  gin.clear_config()
  try:
    gin_utils.parse_gin(['gin/runs/infer.gin', f'{model_dir}/config.gin'],
                        [f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{tmp_path}'",
                         'infer_script.infer.num_examples = 1'],
                        search_paths=[gin_utils.REPO_ROOT])
    gin.get_configurable(infer_script.infer)()
    unused = {u.name: u for u in gin_report.unused_bindings()}
  finally:
    gin.clear_config()
  for field in ('path', 'mode', 'assignment_map'):
    found = unused[f'checkpoints.RestoreCheckpointConfig.{field}']
    assert found.source.kind == gin_report.OPERATIVE_CONFIG
    assert 'infer/checkpoints.RestoreCheckpointConfig' in found.reason


def test_lora_checkpoints_hold_the_adapters_and_decode_as_their_merged_weights(runs, tmp_path):
  """finetune_lora.gin saves only the adapters and names the base; infer decodes the adapted model
  unmerged, and the merged weights (convert --to=merged) decode the same."""
  _, base = runs['pretrain']
  model_dir, checkpoint = runs['finetune_lora']
  saved = checkpoint_reading.saved_tree(checkpoint_reading.item_dir(checkpoint))['params']
  names = [name for name, _ in checkpoint_reading.flatten_with_names(saved)]
  assert names and all(name.endswith(('/lora_a', '/lora_b')) for name in names)
  assert checkpoint_reading.base_checkpoint(checkpoint) == base

  unmerged = _infer(model_dir, checkpoint, tmp_path / 'infer')
  adapted, plain = _model([f'{model_dir}/config.gin']), _model([TINY])
  merged_dir = convert.export_merged(checkpoint, adapted.module.config, str(tmp_path / 'merged'))
  inputs = [record['inputs'] for record in unmerged]
  predictions, scores = {}, {}
  for name, model, path in (('merged', plain, merged_dir), ('unmerged', adapted, checkpoint),
                            ('base', plain, base)):
    im = interactive_model.InteractiveModel(
        batch_size=NUM_EXAMPLES, task_feature_lengths=LENGTHS, output_dir=str(tmp_path / f'im_{name}'),
        partitioner=partitioning.PjitPartitioner(num_partitions=1), model=model,
        checkpoint_path=path, checkpoint_period=0)
    decoded, aux = im.predict_with_aux(inputs)
    predictions[name] = [text.decode() for _, text in decoded]
    scores[name] = np.asarray(aux['scores'])
  assert predictions['merged'] == [record['prediction'] for record in unmerged]
  assert predictions['unmerged'] == predictions['merged']
  np.testing.assert_allclose(scores['unmerged'], scores['merged'], rtol=1e-4, atol=1e-4)
  # The adapters change the model: two steps need not change a greedy decode, but they change its
  # score.
  assert np.abs(scores['base'] - scores['merged']).max() > 1e-3


def test_a_prefix_lm_evaluates_with_decoding_and_scoring_and_infer_scores(runs, tmp_path):
  model_dir, checkpoint = runs['decoder_only']
  with open(os.path.join(model_dir, 'inference_eval', 'sort_digits-metrics.jsonl')) as f:
    metrics = [json.loads(line) for line in f]
  assert [m['step'] for m in metrics] == [1, 2]
  assert set(metrics[-1]) >= {'exact_match', 'log_likelihood'}
  assert math.isfinite(metrics[-1]['log_likelihood']) and metrics[-1]['log_likelihood'] < 0
  with open(os.path.join(model_dir, 'model-info.txt')) as f:
    info = f.read()
  assert 'decoder/token_embedder/embedding' in info and 'encoder/' not in info

  records = _infer(model_dir, checkpoint, tmp_path, mode='score', num_examples=3)
  assert len(records) == 3
  assert all(math.isfinite(r['score']) and r['score'] < 0 and r['targets'] for r in records)


def test_a_prefix_lm_is_served_with_the_input_as_its_prompt(runs, tmp_path):
  """The server continues and scores a decoder-only model's inputs as infer does (text in, text
  out): the same decodes and decode scores, and the same log-likelihoods of the targets."""
  testclient = pytest.importorskip('starlette.testclient')
  from t5train import batching, checkpoints, serving  # noqa: PLC0415  (the serve extra)
  from t5train import serve as serve_script  # noqa: PLC0415
  model_dir, checkpoint = runs['decoder_only']
  decoded = _infer(model_dir, checkpoint, tmp_path / 'p', mode='predict_with_aux', num_examples=4)
  scored = _infer(model_dir, checkpoint, tmp_path / 's', mode='score', num_examples=4)
  batcher, _ = serve_script.load_batcher(
      _model([f'{model_dir}/config.gin']), partitioning.PjitPartitioner(),
      checkpoints.RestoreCheckpointConfig(path=checkpoint),
      batching.BatchingConfig(batch_sizes=(4,), input_lengths=(LENGTHS['inputs'],),
                              target_lengths=(LENGTHS['targets'],), warmup=('greedy', 'score')))
  try:
    with testclient.TestClient(serving.create_app(batcher, serving.RequestLimits())) as client:
      predicted = client.post('/v1/predict', json={'inputs': [r['inputs'] for r in decoded]})
      likelihoods = client.post('/v1/score', json={'inputs': [r['inputs'] for r in scored],
                                                    'targets': [r['targets'] for r in scored]})
  finally:
    batcher.close(10)
  assert predicted.status_code == 200 and likelihoods.status_code == 200, predicted.text
  predictions = predicted.json()['predictions']
  assert [p['output'] for p in predictions] == [r['prediction'] for r in decoded]
  assert [p['score'] for p in predictions] == pytest.approx(
      [r['aux']['scores'] for r in decoded], rel=1e-4, abs=1e-4)
  scores = [s['log_likelihood'] for s in likelihoods.json()['scores']]
  assert len(set(scores)) == len(scores)  # the targets differ, and so do their likelihoods
  assert scores == pytest.approx([r['score'] for r in scored], rel=1e-4, abs=1e-4)
