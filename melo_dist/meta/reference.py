"""The same meta-step as `melo.py`, written as a plain loop over tasks (tests and benchmarks).

No vmap, no task dimension: each task's fast weights are a dict updated with
`torch.autograd.grad(create_graph=True)`, exactly as the algorithm reads on paper. The batched
`meta_step` must give the same loss and gradients; `melo-dist bench meta-step` times both.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from melo_dist.data.tasks import TaskBatch
from melo_dist.meta.melo import (
    MetaLearner,
    last_position,
    lr_key,
    meta_step,
    step_importance,
    times,
)
from melo_dist.models.heads import user_regressors


def task_mse(pred, target, mask, weights=None):
    terms = (pred - target) ** 2 * mask
    if weights is not None:
        terms = weights * terms
    return terms.sum() / max(int(torch.count_nonzero(terms)), 1)


def reference_meta_loss(
    learner: MetaLearner, batch: TaskBatch, iteration: int, balanced: bool = False
) -> torch.Tensor:
    params = dict(learner.backbone.named_parameters())
    importance = step_importance(learner.steps, iteration, learner.multi_step_iterations)
    scale, losses = learner.scale, []
    for b in range(len(batch)):
        items, ratings, mask = (
            batch.support_items[b],
            batch.support_ratings[b],
            batch.support_mask[b],
        )
        target = ratings / scale
        recency = learner.recency_weights(batch.support_age[b], mask)
        fast = {name: params[name] for name in learner.adapted}
        task_loss = 0.0
        for step in range(learner.steps):
            pred = functional_call(learner.backbone, {**params, **fast}, (items,))
            if step == 0:
                task_weights = learner.weight_net(ratings, mask, (pred - target).detach())
            weights = times(learner.weight_net.at_step(task_weights, pred - target), recency)
            loss = task_mse(pred, target, mask, weights)
            grads = torch.autograd.grad(
                loss, list(fast.values()), create_graph=not learner.first_order
            )
            grads = dict(zip(fast, grads))
            if learner.user_params:  # the user parameters' Newton step, as a batch of one task
                design = user_regressors({**params, **fast}, items)
                one = None if weights is None else weights[None]
                newton = learner.user_steps(
                    design[None],
                    mask[None],
                    one,
                    {n: g[None] for n, g in grads.items()},
                    step,
                    not learner.first_order,
                )
                grads.update({name: direction[0] for name, direction in newton.items()})
            fast = {n: w - learner.inner_lrs[lr_key(n)][step] * grads[n] for n, w in fast.items()}
            if importance[step] > 0:
                q_pred = functional_call(
                    learner.backbone, {**params, **fast}, (batch.query_items[b],)
                )
                q_mask = batch.query_mask[b]
                if learner.query_loss == "last":  # each query's target only
                    q_mask = last_position(q_mask)
                q_se = (q_pred - batch.query_ratings[b] / scale) ** 2
                if balanced:
                    q_se = learner.target_weights(batch.query_ratings[b]) * q_se
                task_loss = task_loss + importance[step] * q_se[q_mask].mean()
        losses.append(task_loss)
    return torch.stack(losses).mean()


def reference_meta_step(learner: MetaLearner, batch: TaskBatch, iteration: int):
    return meta_step(learner, batch, iteration, outer_loss=reference_meta_loss)
