"""MELO in one sitting: MAML whose inner loop weights every support position's loss.

Each user is a task with support windows (the inner loop adapts on them) and query windows
(the outer loop scores the adapted model on them). For a meta-batch of B tasks:

1. `MetaLearner` holds what the outer loop learns: the backbone's initialisation, the inner-loss
   weighting (MELO's task-state encoder, or a baseline's) and per-parameter, per-step inner
   learning rates (MAML++ LSLR).
2. `adapt` — the inner loop: J steps of `fast = fast - lr * grad(weighted support loss)`
   (meta.recency: each weight also decays with the position's distance to the target;
   meta.user_step=newton: the bias head's user parameters step along the damped Newton
   direction instead).
3. `meta_loss` — the outer loss: query MSE of the adapted weights (MAML++ multi-step weights).
4. `meta_step` — (loss, gradient of every learner parameter), second order by default.
5. `predict_targets` — adapt, then predict each query's target: what evaluation scores.

Batched over tasks: parameters travel as a dict; each adapted parameter gets a leading task
dimension (an `expand`, no copy), the backbone's plain single-task forward is mapped over it
with `vmap`, and one `autograd.grad` of the summed task losses gives every task its own
gradient (tasks share no fast weights, so the sum separates). DESIGN §3 measured this to be
faster than `grad` inside `vmap`; `melo_dist.meta.reference` is the same algorithm written as a
plain per-task loop, and the tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from melo_dist.config import MetaConfig
from melo_dist.data.tasks import TaskBatch
from melo_dist.meta.weighting import InnerWeighting, rating_levels_index
from melo_dist.models import EMBEDDING_PREFIXES, ITEM_TABLES, USER_PARAMETERS
from melo_dist.models.heads import user_regressors
from melo_dist.models.packing import Packing, even_runs, pack_layout

Params = dict[str, torch.Tensor]
WINDOW_DIMS = (-2, -1)  # a task's support/query windows [..., S, L]
MIN_GROUP = 8  # windows: fewer run with the rest


# -- losses -------------------------------------------------------------------------------


def weighted_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """[..., S, L] -> [...]: the reference's inner loss sum(w * se * mask) / count_nonzero(...)."""
    terms = (pred - target) ** 2 * mask
    if weights is not None:
        terms = weights * terms
    count = (terms != 0).sum(WINDOW_DIMS).clamp(min=1)
    return terms.sum(WINDOW_DIMS) / count


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., W, L] -> [...]: (weighted) mean squared error over a task's masked positions."""
    se = (pred - target) ** 2 * mask
    if weights is not None:
        se = weights * se
    return se.sum(WINDOW_DIMS) / mask.sum(WINDOW_DIMS).clamp(min=1)


def times(weights: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    """The product of two optional inner-loss weightings (None: every position weighs 1)."""
    if weights is None or other is None:
        return other if weights is None else weights
    return weights * other


def last_position(mask: torch.Tensor) -> torch.Tensor:
    """Keep only the last position of each (left-padded) window: the query target."""
    return mask & (torch.arange(mask.shape[-1], device=mask.device) == mask.shape[-1] - 1)


def newton_direction(
    design: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    grad: torch.Tensor,
    damping: torch.Tensor,
) -> torch.Tensor:
    """The user parameters' gradient [..., P] preconditioned by the damped Gauss-Newton matrix of
    the weighted support loss (weights held fixed). The prediction is linear in them, with
    regressors `design` [..., S, L, P], so a step of lr 1 lands on the weighted ridge fit of the
    support residuals whatever the curvature; a plain gradient step with one learned lr
    overshoots for some users and oscillates (results/ml1m-subset-findings.md)."""
    weighted = mask.to(design.dtype) if weights is None else weights * mask
    count = mask.sum(WINDOW_DIMS).clamp(min=1)[..., None, None]
    gauss_newton = 2 * torch.einsum("...slp,...sl,...slq->...pq", design, weighted, design) / count
    solved = torch.linalg.solve(gauss_newton + torch.diag(damping), grad.unsqueeze(-1))
    return solved.squeeze(-1)


def step_importance(steps: int, iteration: int, multi_step_iterations: int) -> list[float]:
    """MAML++ per-step query-loss weights: uniform at first, annealed onto the last step."""
    if iteration >= multi_step_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decay = iteration / steps / multi_step_iterations
    floor = 0.03 / steps
    early = [max(1.0 / steps - decay, floor)] * (steps - 1)
    last = min(1.0 / steps + decay * (steps - 1), 1.0 - (steps - 1) * floor)
    return [*early, last]


def window_groups(items: torch.Tensor, groups: int) -> list[tuple[slice, int]]:
    """Split the windows [B, W, L] into at most `groups` runs of neighbouring windows (of 8 or
    more: a call has its cost too), each with the number of left-padding columns all its
    windows share in every task. Sampling orders each task's windows by length, so neighbours
    are alike."""
    longest = (items > 0).sum(-1).amax(0).tolist()  # [W] over tasks
    groups = max(1, min(groups, len(longest) // MIN_GROUP))
    length = items.shape[-1]
    return [
        (slice(start, end), length - max(1, *longest[start:end]))
        for start, end in even_runs(len(longest), groups)
    ]


def pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` (the time axis) in place of dropped padding columns."""
    if not columns:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


# -- 1. the meta-learned state ----------------------------------------------------------


def adapted_names(backbone: nn.Module, adapt: str) -> list[str]:
    """Which backbone parameters the inner loop adapts (meta.adapt)."""
    names = [name for name, _ in backbone.named_parameters()]
    if adapt == "no_embeddings":
        return [n for n in names if not n.startswith(EMBEDDING_PREFIXES)]
    if adapt == "head":
        return [n for n in names if n.startswith("head.")]
    if adapt == "user":
        return [n for n in names if n in USER_PARAMETERS]
    return names


def initial_lr(name: str, meta: MetaConfig) -> float:
    """LSLR start: meta.inner_lr, but for the bias head's per-user parameters (they start at 0:
    a step of 1e-3 would leave them there) a full Newton step, or meta.user_inner_lr."""
    if name not in USER_PARAMETERS:
        return meta.inner_lr
    return 1.0 if meta.user_step == "newton" else meta.user_inner_lr


def lr_key(name: str) -> str:
    """ParameterDict keys cannot contain '.'."""
    return name.replace(".", "__")


class MetaLearner(nn.Module):
    """The backbone's initialisation, the shared inner-loss weighting, the inner learning rates,
    and how the outer loop uses them (first or second order, the multi-step phase)."""

    def __init__(
        self,
        backbone: nn.Module,
        weight_net: InnerWeighting,
        meta: MetaConfig,
        scale: float,
        levels: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.weight_net = backbone, weight_net
        self.adapted = adapted_names(backbone, meta.adapt)
        # When only the head adapts, the backbone's features do not depend on the fast weights:
        # each window set runs the backbone once, and every inner step runs only the head.
        self.head_only = all(name.startswith("head.") for name in self.adapted)
        self.item_tables = [name for name, _ in backbone.named_parameters() if name in ITEM_TABLES]
        self.steps = meta.inner_steps
        self.first_order = meta.first_order
        self.query_loss = meta.query_loss
        self.multi_step_iterations = meta.multi_step_iterations
        self.inner_lrs = nn.ParameterDict(
            {
                lr_key(name): nn.Parameter(torch.full((meta.inner_steps,), initial_lr(name, meta)))
                for name in self.adapted
            }
        )
        self.scale = scale  # predictions are compared with rating / scale
        self.outer_loss = meta.outer_loss
        if meta.outer_loss != "mse":  # per rating level; set from the training data
            self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32))
            self.register_buffer("outer_weights", torch.ones(len(levels)))
        # meta.user_step=newton: the user bias and factors step along the damped Newton
        # direction; the damping (log, per step, bias then factors) is learned with the lrs.
        newton = meta.user_step == "newton"
        self.user_params = [n for n in USER_PARAMETERS if newton and n in self.adapted]
        if self.user_params:  # one damping for the bias, one for the factors
            self.inner_lrs["log_user_damping"] = nn.Parameter(
                torch.full((meta.inner_steps, len(self.user_params)), math.log(meta.user_damping))
            )
        if meta.recency:  # the recency weights' decay per interaction, learned with the lrs
            self.inner_lrs["recency_decay"] = nn.Parameter(torch.tensor(meta.recency_decay))

    @property
    def encoder_balanced(self) -> bool:
        """meta.outer_loss=encoder_balanced, with an encoder that learns (MELO's)."""
        learns = any(p.requires_grad for p in self.weight_net.parameters())
        return self.outer_loss == "encoder_balanced" and learns

    def target_weights(self, ratings: torch.Tensor) -> torch.Tensor:
        """The class-balanced outer loss: each query position's weight, by its rating level."""
        per_level = torch.cat([self.outer_weights.new_zeros(1), self.outer_weights])
        return per_level[rating_levels_index(ratings, self.levels.to(ratings.dtype))].to(
            ratings.dtype
        )

    def recency_weights(self, age: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """meta.recency: each support position's weight exp(-decay * age) [..., S, L], age the
        interactions between it and the target, scaled to a mean of 1 over the task's positions
        (it shifts the inner loss towards recent ratings without changing its total); None
        when off. It does not change across inner steps, so it is computed once per task."""
        if "recency_decay" not in self.inner_lrs:
            return None
        recency = torch.exp(-self.inner_lrs["recency_decay"] * age) * mask
        total = recency.sum(WINDOW_DIMS).clamp(min=1e-12)  # a task without support: 0
        return recency * (mask.sum(WINDOW_DIMS) / total)[..., None, None]

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        return predict_targets(self, batch)

    def task_params(self, rows: torch.Tensor) -> Params:
        """Each task's own parameters [B, ...]: the rows [B, U] of the item tables its windows
        use (a catalogue-sized table per task would cost [B, items, dim] per inner step; the
        other rows get zero gradient, so they keep the meta weights exactly), and the other
        adapted parameters expanded (no copy)."""
        params = dict(self.backbone.named_parameters())
        own = {name: params[name][rows] for name in self.item_tables}
        for name in self.adapted:
            own.setdefault(name, params[name].expand(len(rows), *params[name].shape))
        return own

    def forward_tasks(
        self,
        fast: Params,
        items: torch.Tensor,
        features: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Per-task predictions [B, W, L] (or features, `head=False`; or the head alone on
        `features`): `fast` holds the [B, ...] per-task parameters. Windows run in groups of
        neighbours, each without the left padding all its windows share (exact: see
        `SequenceRegressor`); the outputs are padded back to L. Backbones that pack tokens
        (the transformers) run only attention in those groups, the rest on real tokens."""
        params = {**dict(self.backbone.named_parameters()), **fast}
        param_dims = {name: 0 if name in fast else None for name in params}
        groups = window_groups(items, self.backbone.window_groups if features is None else 1)
        if features is None and self.backbone.packs_tokens:  # real tokens only: packing.py
            run = vmap(
                lambda p, x, layout: functional_call(
                    self.backbone,
                    p,
                    (x,),
                    {"head": head, "packing": Packing(**layout, groups=groups)},
                ),
                in_dims=(param_dims, 0, 0),
                randomness="different",
            )
            return run(params, items, pack_layout(items, groups))
        outputs = []  # (a head is cheap: it runs as one group)
        for group, skipped in groups:
            run = vmap(
                lambda p, x, f, skipped=skipped: functional_call(
                    self.backbone, p, (x,), {"features": f, "head": head, "skipped": skipped}
                ),
                in_dims=(param_dims, 0, None if features is None else 0),
                randomness="different",
            )
            part = None if features is None else features[:, group, skipped:]
            out = run(params, items[:, group, skipped:], part)
            time_dim = out.dim() - (1 if head else 2)
            outputs.append(pad_left(out, skipped, time_dim))
        return torch.cat(outputs, dim=1)

    def predictor(
        self, fast: Params, items: torch.Tensor, copies: int = 1
    ) -> Callable[[Params], torch.Tensor]:
        """The predictions [copies * B, W, L] of the windows `items` [B, W, L] as a function of
        `copies` per-task parameter sets stacked along the task dimension [copies * B, ...]
        (one pass scores the same windows under each set). `fast` [B, ...] is read only when
        the head alone adapts: the backbone's features, computed once."""

        def tile(x: torch.Tensor) -> torch.Tensor:
            return x.repeat(copies, *[1] * (x.dim() - 1)) if copies > 1 else x

        features = tile(self.forward_tasks(fast, items, head=False)) if self.head_only else None
        items = tile(items)
        return lambda params: self.forward_tasks(params, items, features)

    def user_steps(
        self,
        design: torch.Tensor,
        mask: torch.Tensor,
        weights: torch.Tensor | None,
        grads: Params,
        step: int,
        create_graph: bool,
    ) -> Params:
        """The user parameters' Newton directions [B, ...] at `step`, in place of their gradients.
        First order treats the curvature as the gradient is treated: as data."""
        if not create_graph:
            design = design.detach()
            weights = None if weights is None else weights.detach()
        user = [grads[name].reshape(len(grads[name]), -1) for name in self.user_params]
        sizes = [part.shape[-1] for part in user]  # 1 (the bias), then k (the factors)
        log_damping = self.inner_lrs["log_user_damping"][step]
        damping = log_damping.repeat_interleave(
            torch.tensor(sizes, device=log_damping.device)
        ).exp()
        direction = newton_direction(design, mask, weights, torch.cat(user, -1), damping)
        return {
            name: part.reshape(grads[name].shape)
            for name, part in zip(self.user_params, direction.split(sizes, -1))
        }

    # -- 2. the inner loop ------------------------------------------------------------------

    def adapt(self, rows: torch.Tensor, batch: TaskBatch, create_graph: bool) -> list[Params]:
        """J inner steps on the support windows [B, S, L] of `batch` (items in task-local ids,
        `rows` their catalogue ids: `TaskBatch.with_local_items`); the per-task parameters
        after each step."""
        items, ratings, mask = batch.support_items, batch.support_ratings, batch.support_mask
        fast = self.task_params(rows)
        predict = self.predictor(fast, items)
        recency = self.recency_weights(batch.support_age, mask)
        target = ratings / self.scale
        trajectory = []
        for step in range(self.steps):
            pred = predict(fast)
            if step == 0:  # once per task, not once per step (the error as data)
                task_weights = self.weight_net(ratings, mask, (pred - target).detach())
            weights = times(self.weight_net.at_step(task_weights, pred - target), recency)
            loss = weighted_loss(pred, target, mask, weights).sum()
            adapted = [fast[name] for name in self.adapted]
            grads = torch.autograd.grad(loss, adapted, create_graph=create_graph)
            grads = dict(zip(self.adapted, grads))
            if self.user_params:
                design = vmap(user_regressors)(fast, items)
                grads.update(self.user_steps(design, mask, weights, grads, step, create_graph))
            fast = {
                **fast,
                **{
                    name: fast[name] - self.inner_lrs[lr_key(name)][step] * grads[name]
                    for name in self.adapted
                },
            }
            trajectory.append(fast)
        return trajectory


# -- 3. the outer loss --------------------------------------------------------------------


def meta_loss(
    learner: MetaLearner, batch: TaskBatch, iteration: int, balanced: bool = False
) -> torch.Tensor:
    """The meta-batch's outer loss: mean over tasks of the query MSE after adaptation (each
    target weighted by its rating level's class-balanced weight when `balanced`).

    By default only each query's last position (the target) is scored, as in evaluation: the
    earlier positions of a query are interactions the support windows already hold, so scoring
    them rewards the inner loop for memorising its support set. meta.query_loss=all scores every
    position, as the authors' code does.
    """
    create_graph = learner.training and not learner.first_order
    batch, rows = batch.with_local_items()
    trajectory = learner.adapt(rows, batch, create_graph)
    importance = step_importance(learner.steps, iteration, learner.multi_step_iterations)
    target = batch.query_ratings / learner.scale
    scored = last_position(batch.query_mask) if learner.query_loss == "last" else batch.query_mask
    weights = learner.target_weights(batch.query_ratings) if balanced else None
    # The scored steps' queries run in one pass, their fast weights stacked along the task
    # dimension: a recurrent backbone walks its time steps once, not once per step.
    weighted_steps = [(fast, w) for fast, w in zip(trajectory, importance) if w > 0]
    stacked = {
        name: torch.cat([fast[name] for fast, _ in weighted_steps]) for name in trajectory[0]
    }
    predict = learner.predictor(trajectory[0], batch.query_items, copies=len(weighted_steps))
    pred = predict(stacked).unflatten(0, (len(weighted_steps), -1))  # [steps, B, Q, L]
    per_step = masked_mse(pred, target, scored, weights).mean(-1)
    return per_step @ per_step.new_tensor([weight for _, weight in weighted_steps])


# -- 4. the meta-step ---------------------------------------------------------------------


def meta_step(
    learner: nn.Module, batch: TaskBatch, iteration: int, outer_loss: Callable = meta_loss
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradient of every learner parameter); parameters the loss does not reach get 0.
    Any other learner with a `loss(batch, iteration)` steps on it (`BasicLearner`).
    meta.outer_loss=encoder_balanced: the task-state encoder's gradient comes from the
    class-balanced outer loss (a second adaptation), every other one from plain MSE.
    `outer_loss` is the loss as computed (`melo_dist.meta.reference` passes its task loop)."""
    if not isinstance(learner, MetaLearner):
        return with_gradients(learner, learner.loss(batch, iteration))
    balanced = learner.outer_loss == "class_balanced"
    loss, grads = with_gradients(learner, outer_loss(learner, batch, iteration, balanced))
    if learner.encoder_balanced:
        encoder_loss = outer_loss(learner, batch, iteration, True)
        _, encoder = with_gradients(learner.weight_net, encoder_loss)
        grads.update({f"weight_net.{name}": grad for name, grad in encoder.items()})
    return loss, grads


def with_gradients(
    learner: nn.Module, loss: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    named = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(named, grads)
    }


# -- 5. prediction after adaptation --------------------------------------------------------


def predict_targets(learner: MetaLearner, batch: TaskBatch) -> torch.Tensor:
    """[B, Q] predicted rating (rating scale) of each query's last position, after adaptation."""
    batch, rows = batch.with_local_items()
    with torch.enable_grad():  # the inner loop needs gradients even when evaluating
        trajectory = learner.adapt(rows, batch, False)
    fast = {name: value.detach() for name, value in trajectory[-1].items()}
    with torch.no_grad():
        pred = learner.forward_tasks(fast, batch.query_items)
    return pred[..., -1] * learner.scale
