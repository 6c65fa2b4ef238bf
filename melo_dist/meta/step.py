"""The outer step: query loss after adaptation (MAML++ multi-step), gradients, predictions.

`meta_step(learner, batch, iteration) -> (loss, grads)` is the one function the local trainer,
the Ray workers and the tests call.
"""

from __future__ import annotations

import torch

from melo_dist.data.tasks import TaskBatch
from melo_dist.meta.adapt import MetaLearner
from melo_dist.meta.losses import last_position, masked_mse


def step_importance(steps: int, iteration: int, multi_step_iterations: int) -> list[float]:
    """MAML++ per-step query-loss weights: uniform at first, annealed onto the last step."""
    if iteration >= multi_step_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decay = iteration / steps / multi_step_iterations
    floor = 0.03 / steps
    early = [max(1.0 / steps - decay, floor)] * (steps - 1)
    last = min(1.0 / steps + decay * (steps - 1), 1.0 - (steps - 1) * floor)
    return [*early, last]


def meta_loss(
    learner: MetaLearner,
    batch: TaskBatch,
    iteration: int,
    multi_step_iterations: int = 0,
    first_order: bool = False,
) -> torch.Tensor:
    """The meta-batch's outer loss: mean over tasks of the query MSE after adaptation.

    Only each query's last position (the target) is scored, as in evaluation: the earlier
    positions of a query are interactions the support windows already hold, so scoring them
    would reward the inner loop for memorising its support set.
    """
    scale = learner.scale
    if learner.regime == "basic":  # no meta-learning: fit every window of the task directly
        items = torch.cat([batch.support_items, batch.query_items], dim=1)
        ratings = torch.cat([batch.support_ratings, batch.query_ratings], dim=1)
        mask = torch.cat([batch.support_mask, batch.query_mask], dim=1)
        return masked_mse(learner.backbone(items), ratings / scale, mask).mean()

    create_graph = learner.training and not first_order
    trajectory = learner.adapt(
        batch.support_items, batch.support_ratings, batch.support_mask, create_graph=create_graph
    )
    importance = step_importance(learner.steps, iteration, multi_step_iterations)
    target = batch.query_ratings / scale
    scored = last_position(batch.query_mask)
    loss = batch.query_ratings.new_zeros(())
    for fast, weight in zip(trajectory, importance):
        if weight > 0:
            pred = learner.forward_tasks(fast, batch.query_items)
            loss = loss + weight * masked_mse(pred, target, scored).mean()
    return loss


def meta_step(
    learner: MetaLearner,
    batch: TaskBatch,
    iteration: int,
    multi_step_iterations: int = 0,
    first_order: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradient of every learner parameter); parameters the loss does not reach get 0."""
    loss = meta_loss(learner, batch, iteration, multi_step_iterations, first_order)
    named = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(named, grads)
    }


def predict_targets(learner: MetaLearner, batch: TaskBatch) -> torch.Tensor:
    """[B, Q] predicted rating (1-5 scale) of each query's last position, after adaptation."""
    fast = {}
    if learner.regime != "basic":
        with torch.enable_grad():  # the inner loop needs gradients even when evaluating
            fast = learner.adapt(
                batch.support_items, batch.support_ratings, batch.support_mask, create_graph=False
            )[-1]
        fast = {name: value.detach() for name, value in fast.items()}
    with torch.no_grad():
        pred = learner.forward_tasks(fast, batch.query_items)
    return pred[..., -1] * learner.scale
