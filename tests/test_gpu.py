"""Training on a GPU gives what training on the CPU gives. Skipped where torch sees no CUDA
device (CI and the team's CPU machines); run on a GPU machine with `pytest tests/test_gpu.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from test_meta import assert_same, learner_for, small_batch, small_config

from melo_dist.config import BACKBONES
from melo_dist.data.dataset import load_dataset
from melo_dist.meta.melo import meta_step, predict_targets
from melo_dist.training.checkpoint import LAST, load_checkpoint, read_metrics
from melo_dist.training.loop import train_local
from melo_dist.training.run import TrainingRun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("head", ["bias", "reference"])
@pytest.mark.parametrize("regime", ["melo", "maml"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_meta_step_on_the_gpu_equals_the_cpu(backbone, regime, head):
    # float64 on both: what differs is only the order of the GPU's reductions
    config = small_config(backbone, regime, head, inner_steps=2, multi_step_iterations=10)
    learner = learner_for(config)
    batch = small_batch(tasks=5)
    loss, grads = meta_step(learner, batch, 3)
    gpu_loss, gpu_grads = meta_step(copy.deepcopy(learner).cuda(), batch.to("cuda"), 3)
    assert torch.allclose(gpu_loss.cpu(), loss, rtol=1e-9)
    assert_same({name: grad.cpu() for name, grad in gpu_grads.items()}, grads, rtol=1e-7)
    cpu_pred = predict_targets(learner.eval(), batch)
    gpu_pred = predict_targets(copy.deepcopy(learner).cuda().eval(), batch.to("cuda"))
    assert torch.allclose(gpu_pred.cpu(), cpu_pred, rtol=1e-9)


def test_a_run_trained_on_the_gpu_validates_the_same_on_the_cpu(synthetic_dir, tmp_path):
    config = tiny_config(synthetic_dir, tmp_path / "run", iterations=4)
    train_local(config, log=print, device="cuda")
    run = TrainingRun(config, load_dataset(config.data))  # on the CPU
    run.load_state_dict(load_checkpoint(tmp_path / "run" / LAST))
    last = read_metrics(tmp_path / "run")[-1]
    assert run.validate()["rmse"] == pytest.approx(last["valid_rmse"], rel=1e-5)
