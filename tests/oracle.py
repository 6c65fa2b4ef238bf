"""The per-task loop oracle: MAML/MELO written plainly, one task at a time (tests and bench only).

No vmap, no task dimension: each task's fast weights are a dict updated with
`torch.autograd.grad(create_graph=True)`, exactly as the algorithm reads on paper. The batched
implementation in melo_dist.meta must give the same loss and gradients.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from melo_dist.data.tasks import TaskBatch
from melo_dist.meta.adapt import MetaLearner, lr_key
from melo_dist.meta.step import step_importance


def task_mse(pred, target, mask, weights=None):
    terms = (pred - target) ** 2 * mask
    if weights is not None:
        terms = weights * terms
    return terms.sum() / max(int(torch.count_nonzero(terms)), 1)


def oracle_meta_loss(
    learner: MetaLearner,
    batch: TaskBatch,
    iteration: int = 0,
    multi_step_iterations: int = 0,
    first_order: bool = False,
) -> torch.Tensor:
    params = dict(learner.backbone.named_parameters())
    importance = step_importance(learner.steps, iteration, multi_step_iterations)
    scale, losses = learner.scale, []
    for b in range(len(batch)):
        items, ratings, mask = (
            batch.support_items[b],
            batch.support_ratings[b],
            batch.support_mask[b],
        )
        target = ratings / scale
        if learner.weight_net is not None:
            weights = learner.weight_net(ratings, mask)
        elif learner.regime == "class_balanced":
            levels, counts = torch.unique(ratings[mask], return_counts=True)
            frequency = dict(zip(levels.tolist(), counts.tolist()))
            weights = torch.zeros_like(ratings)
            for value, count in frequency.items():
                weights[(ratings == value) & mask] = mask.sum() / (len(frequency) * count)
        else:
            weights = None
        fast = {name: params[name] for name in learner.adapted}
        task_loss = 0.0
        for step in range(learner.steps):
            pred = functional_call(learner.backbone, {**params, **fast}, (items,))
            if learner.regime == "focal":
                weights = (pred - target).abs()
            loss = task_mse(pred, target, mask, weights)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {
                n: w - learner.inner_lrs[lr_key(n)][step] * g
                for (n, w), g in zip(fast.items(), grads)
            }
            if importance[step] > 0:
                q_pred = functional_call(
                    learner.backbone, {**params, **fast}, (batch.query_items[b],)
                )
                # the outer loss scores each query's last position (its target) only
                q_valid = batch.query_mask[b][:, -1]
                q_se = (q_pred[:, -1] - batch.query_ratings[b][:, -1] / scale) ** 2
                task_loss = task_loss + importance[step] * q_se[q_valid].mean()
        losses.append(task_loss)
    return torch.stack(losses).mean()


def oracle_meta_step(
    learner: MetaLearner,
    batch: TaskBatch,
    iteration: int = 0,
    multi_step_iterations: int = 0,
    first_order: bool = False,
):
    loss = oracle_meta_loss(learner, batch, iteration, multi_step_iterations, first_order)
    named = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)
    }
