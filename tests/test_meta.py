"""The meta-learner: batched step == per-task oracle, weights reach the encoder, MELO -> MAML."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.func import functional_call, vmap

from melo_dist.config import BACKBONES, Config
from melo_dist.data.synthetic import random_task_rows
from melo_dist.data.tasks import TaskBatch, WindowSpec, sample_tasks
from melo_dist.meta import build_learner
from melo_dist.meta.melo import (
    lr_key,
    meta_step,
    predict_targets,
    step_importance,
    window_groups,
)
from melo_dist.meta.reference import reference_meta_step
from melo_dist.meta.weighting import ClassBalanced, InnerWeighting
from melo_dist.models.layers import GRU, attention_mask
from melo_dist.models.packing import Packing, pack_layout
from melo_dist.report.learned import inner_learning_rates

LEVELS = [1.0, 2.0, 3.0, 4.0, 5.0]
ITEMS = 40
INNER_LOSSES = ("maml", "melo", "focal", "class_balanced", "stats_mlp")


def small_config(backbone: str, regime: str, head: str = "bias", **meta) -> Config:
    config = Config()
    config.model.backbone, config.meta.regime, config.model.head = backbone, regime, head
    config.model.user_factors = 3 if head == "bias" else 0
    config.model.dim, config.model.heads, config.model.ffn = 8, 2, 16
    config.model.dropout, config.model.max_length, config.data.window = 0.0, 8, 8
    config.model.encoder_embed, config.model.encoder_hidden = 4, 8
    config.meta.inner_lr = 0.3  # large enough that adaptation visibly changes the weights
    for key, value in meta.items():
        setattr(config.meta, key, value)
    return config.validate()


def small_batch(
    tasks: int = 3,
    seed: int = 0,
    dtype=torch.float64,
    lengths: tuple[int, int] = (4, 14),
    support: int = 4,
    support_windows: str = "sampled",
) -> TaskBatch:
    rows = random_task_rows(tasks, ITEMS, lengths, seed)
    spec = WindowSpec(length=8, support=support, query=2, support_windows=support_windows)
    batch = sample_tasks(rows, spec, seed=seed, train=True)
    return replace(
        batch,
        support_ratings=batch.support_ratings.to(dtype),
        query_ratings=batch.query_ratings.to(dtype),
    )


def learner_for(config: Config, seed: int = 0):
    torch.manual_seed(seed)
    learner = build_learner(config, ITEMS, LEVELS).double()
    if config.model.head == "bias":  # as training starts it: from rating statistics
        item_bias = torch.randn(ITEMS + 1, generator=torch.Generator().manual_seed(seed))
        learner.backbone.head.init_from_ratings(0.7, 0.1 * item_bias)
    return learner


def assert_same(grads: dict, expected: dict, rtol: float = 1e-9) -> None:
    """Equal to float64 round-off, relative to each parameter's gradient. A gradient that is 0 in
    exact arithmetic (the softmax encoder's output bias: softmax ignores a shift) is round-off
    alone, so it is compared on a millionth of the largest gradient's scale instead."""
    assert grads.keys() == expected.keys()
    largest = max(float(g.abs().max()) for g in expected.values())
    for name in grads:
        scale = max(float(expected[name].abs().max()), 1e-6 * largest)
        error = float((grads[name] - expected[name]).abs().max()) / scale
        assert error < rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize(
    ("head", "query_loss", "user_step", "recency"),
    [
        ("bias", "last", "newton", True),
        ("bias", "all", "gradient", False),
        ("reference", "all", "newton", True),
    ],
)
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("regime", INNER_LOSSES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop(
    backbone, regime, first_order, head, query_loss, user_step, recency
):
    # iteration 3 of a 10-iteration multi-step phase: every step's query loss counts
    config = small_config(
        backbone,
        regime,
        head,
        inner_steps=2,
        multi_step_iterations=10,
        first_order=first_order,
        query_loss=query_loss,
        user_step=user_step,
        recency=recency,
    )
    learner = learner_for(config)
    if recency:  # weights that differ by age (they start equal)
        learner.inner_lrs["recency_decay"].data.fill_(0.3)
    batch = small_batch()
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("inner_lrs."))
    if recency and not first_order:  # (first order: the inner gradients are data)
        assert grads["inner_lrs.recency_decay"].abs() > 0


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop_in_window_groups(backbone, first_order):
    # 16 support windows of histories of 3-6 interactions in windows of 8: the windows run in
    # groups that drop padding columns, which the recurrent backbones replace by the state
    # reading them would have left. The same 16 windows serve as queries, so the multi-step
    # phase's one pass over both steps' queries runs in groups too.
    config = small_config(backbone, "melo", "reference", inner_steps=2, first_order=first_order)
    learner = learner_for(config)
    batch = small_batch(tasks=4, lengths=(3, 6), support=16)
    batch = replace(
        batch,
        query_items=batch.support_items,
        query_ratings=batch.support_ratings,
        query_mask=batch.support_mask,
    )
    groups = window_groups(batch.support_items, learner.backbone.window_groups)
    assert len(groups) == min(learner.backbone.window_groups, 2)
    assert all(skipped >= 3 for _, skipped in groups)
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("regime", ["melo", "maml"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop_on_the_history_window(
    backbone, regime, first_order
):
    # data.support_windows=history: one support window a task, the whole history (histories of
    # 2-14 in windows of 8: a one-rating history too), with the shipped head and recency
    config = small_config(backbone, regime, "bias", inner_steps=2, first_order=first_order)
    config.meta.recency = True
    learner = learner_for(config)
    learner.inner_lrs["recency_decay"].data.fill_(0.3)
    batch = small_batch(tasks=6, lengths=(2, 14), support_windows="history")
    assert batch.support_items.shape[1] == 1
    assert batch.support_mask.sum((1, 2)).min() == 1
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_packed_tokens_give_what_the_padded_windows_give(backbone):
    # the transformers run their position-wise layers on each task's real tokens only; every
    # real position's output and features are what the plain padded forward gives, padding 0
    learner = learner_for(small_config(backbone, "melo", "reference"))
    assert learner.backbone.packs_tokens
    batch = small_batch(tasks=4, lengths=(3, 6), support=16)
    items, real = batch.support_items, batch.support_mask
    assert len(set(real.sum((1, 2)).tolist())) > 1  # tasks of different token counts
    fast = {
        name: value.detach()
        for name, value in learner.task_params(torch.arange(ITEMS + 1).expand(4, -1)).items()
    }
    for head in (True, False):  # ratings [B, W, L]; features [B, W, L, D]
        packed = learner.forward_tasks(fast, items, head=head)
        padded = learner.backbone(items, head=head)
        assert torch.allclose(packed[real], padded[real], rtol=1e-12, atol=1e-12)
        assert (packed[~real] == 0).all()


def test_pack_layout_indexes_each_tasks_real_tokens():
    items = torch.tensor([[[0, 0, 5], [0, 6, 7]], [[0, 0, 0], [0, 0, 8]]])  # [2 tasks, 2, 3]
    groups = [(slice(0, 1), 2), (slice(1, 2), 1)]
    layout = pack_layout(items, groups)
    assert layout["tokens"].tolist() == [[2, 4, 5], [5, 0, 1]]  # task 2: one real, 2 spare
    assert layout["slots"][1].tolist() == [[3, 3, 3], [3, 3, 0]]  # T = 3: the zero row
    assert layout["returns"][0].tolist() == [0, 1, 2]  # group rows: (0, 2); (1, 1), (1, 2)
    packing = Packing(**{k: v[0] for k, v in layout.items()}, groups=groups)
    assert packing.pack(items[0]).tolist() == [5, 6, 7]
    assert packing.unpack(torch.tensor([5, 6, 7])).tolist() == items[0].tolist()
    parts = packing.split(torch.tensor([[5], [6], [7]]))
    assert [part.squeeze(-1).tolist() for part in parts] == [[[5]], [[6, 7]]]
    assert packing.join(parts).squeeze(-1).tolist() == [5, 6, 7]


def test_window_groups_split_neighbours_and_keep_their_common_padding():
    lengths = torch.tensor([[0] * 6 + [2, 3] + [4] * 7 + [6], [1] * 6 + [2, 5] + [3] * 7 + [7]])
    items = (torch.arange(8) >= 8 - lengths[..., None]).long()  # [2, 16, 8], left-padded
    assert window_groups(items, 2) == [(slice(0, 8), 3), (slice(8, 16), 1)]
    assert window_groups(items, 3) == window_groups(items, 2)  # groups of 8 windows at least
    assert window_groups(items, 1) == [(slice(0, 16), 1)]
    assert window_groups(items[:, :1], 4) == [(slice(0, 1), 7)]  # one column at least


def test_sampled_windows_are_ordered_shortest_first():
    batch = small_batch(tasks=12, lengths=(2, 14))
    for mask in (batch.support_mask, batch.query_mask):
        lengths = mask.sum(-1)
        key = torch.where(lengths > 0, lengths, mask.shape[-1] + 1)  # empty slots last
        assert (key[:, 1:] >= key[:, :-1]).all()
        assert len(set(lengths.flatten().tolist())) > 2
    assert (batch.query_mask.sum(-1) == 0).any()  # some users have an empty query slot


@pytest.mark.parametrize("adapt", ["head", "user", "no_embeddings"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop_when_part_adapts(backbone, adapt):
    """adapt=head (and user) runs the backbone once per window set and only the head per
    inner step."""
    config = small_config(backbone, "melo", inner_steps=3, multi_step_iterations=10, adapt=adapt)
    learner = learner_for(config)
    assert learner.head_only == (adapt != "no_embeddings")
    batch = small_batch()
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)


@pytest.mark.parametrize("query_loss", ["last", "all"])
@pytest.mark.parametrize("regime", ["maml", "melo"])
def test_batched_meta_step_matches_per_task_loop_class_balanced_outer_loss(regime, query_loss):
    config = small_config("sasrec", regime, inner_steps=2, multi_step_iterations=10)
    config.meta.outer_loss, config.meta.query_loss = "class_balanced", query_loss
    learner = learner_for(config)
    learner.outer_weights.copy_(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25]))
    batch = small_batch()
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)
    learner.outer_weights.fill_(1.0)  # all weights 1: the plain outer loss
    config.meta.outer_loss = "mse"
    plain = learner_for(config)
    plain.load_state_dict(
        {k: v for k, v in learner.state_dict().items() if "outer" not in k and k != "levels"}
    )
    assert torch.allclose(
        meta_step(learner, batch, 3)[0], meta_step(plain, batch, 3)[0], rtol=1e-12
    )


@pytest.mark.parametrize("regime", ["maml", "melo"])
def test_encoder_balanced_outer_loss_splits_the_gradient(regime):
    """meta.outer_loss=encoder_balanced: the encoder's gradient is the class-balanced loss's,
    every other one (and the reported loss) plain MSE's; batched equals the task loop."""
    config = small_config("sasrec", regime, inner_steps=2, multi_step_iterations=10)
    learners = {}
    for outer_loss in ("encoder_balanced", "class_balanced", "mse"):
        config.meta.outer_loss = outer_loss
        learners[outer_loss] = learner_for(config)
        if outer_loss != "mse":
            learners[outer_loss].outer_weights.copy_(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25]))
    batch = small_batch()
    loss, grads = meta_step(learners["encoder_balanced"], batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learners["encoder_balanced"], batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)
    mse_loss, mse = meta_step(learners["mse"], batch, 3)
    _, balanced = meta_step(learners["class_balanced"], batch, 3)
    assert torch.allclose(loss, mse_loss, rtol=1e-12)
    encoder = {n for n in grads if n.startswith("weight_net.")}
    assert (regime == "melo") == bool(encoder)  # MAML has no encoder: plain MSE throughout
    others = grads.keys() - encoder
    assert_same({n: grads[n] for n in others}, {n: mse[n] for n in others})
    if encoder:  # the balanced loss's, which moves the encoder otherwise than plain MSE
        assert_same({n: grads[n] for n in encoder}, {n: balanced[n] for n in encoder})
        assert any(not torch.allclose(grads[n], mse[n]) for n in encoder)


@pytest.mark.parametrize("output", ["softmax", "task_mean"])
@pytest.mark.parametrize("iteration", [3, 12], ids=["multi-step", "past-multi-step"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop_encoder_outputs(backbone, iteration, output):
    """The softmax and task-mean encoder outputs, 3 inner steps, inside and past the multi-step
    phase (10)."""
    config = small_config(backbone, "melo", inner_steps=3, multi_step_iterations=10)
    config.model.encoder_output = output
    learner = learner_for(config)
    batch = small_batch()
    loss, grads = meta_step(learner, batch, iteration)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, iteration)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_batched_meta_step_matches_per_task_loop_encoder_reading_errors(backbone, first_order):
    config = small_config(backbone, "melo", inner_steps=2, first_order=first_order, recency=True)
    config.model.encoder_error = True
    learner = learner_for(config)
    batch = small_batch()
    loss, grads = meta_step(learner, batch, 3)
    oracle_loss, oracle_grads = reference_meta_step(learner, batch, 3)
    assert torch.allclose(loss, oracle_loss, rtol=1e-10)
    assert_same(grads, oracle_grads)


def test_encoder_reading_errors_weighs_by_them():
    """Its weights move with the error it is given (on top of the rating levels), it refuses to
    run without one, and the meta-gradient reaches its error input's weights."""
    config = small_config("gru4rec", "melo")
    config.model.encoder_error = True
    learner = learner_for(config)
    batch = small_batch()
    ratings, mask = batch.support_ratings, batch.support_mask
    error = torch.randn(
        ratings.shape, dtype=ratings.dtype, generator=torch.Generator().manual_seed(1)
    )
    encoder = learner.weight_net
    assert not torch.allclose(encoder(ratings, mask, error), encoder(ratings, mask, 0 * error))
    with pytest.raises(ValueError, match="error"):
        encoder(ratings, mask)
    _, grads = meta_step(learner, batch, 0)
    error_column = grads["weight_net.lstm.input_proj.weight"][:, -1]  # the error's input weights
    assert float(error_column.abs().sum()) > 0


def test_adaptive_weights_reach_the_encoder_and_change_the_update():
    batch = small_batch(tasks=4)
    _, melo = meta_step(learner_for(small_config("sasrec", "melo")), batch, 0)
    encoder = [g for n, g in melo.items() if n.startswith("weight_net.")]
    assert encoder and all(torch.isfinite(g).all() for g in encoder)
    assert sum(float(g.abs().sum()) for g in encoder) > 0
    _, maml = meta_step(learner_for(small_config("sasrec", "maml")), batch, 0)
    differs = [not torch.allclose(melo[n], maml[n]) for n in maml if n.startswith("backbone.")]
    assert all(differs)


def test_first_order_gives_the_encoder_no_gradient():
    """Documented limitation: the weights act only through the inner updates."""
    _, grads = meta_step(
        learner_for(small_config("gru4rec", "melo", first_order=True)), small_batch(), 0
    )
    assert all(float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith("weight_net."))


class ConstantWeights(InnerWeighting):
    def forward(self, ratings: torch.Tensor, mask: torch.Tensor, error=None) -> torch.Tensor:
        return torch.ones_like(ratings)


@pytest.mark.parametrize("backbone", ["gru4rec", "sasrec"])
def test_melo_with_constant_weights_is_maml(backbone):
    batch = small_batch(tasks=4)
    melo = learner_for(small_config(backbone, "melo"))
    melo.weight_net = ConstantWeights()
    loss, grads = meta_step(melo, batch, 0)
    maml_loss, maml_grads = meta_step(learner_for(small_config(backbone, "maml")), batch, 0)
    assert torch.allclose(loss, maml_loss, rtol=1e-12)
    assert_same(grads, maml_grads, rtol=1e-10)


@pytest.mark.parametrize(
    ("head", "adapt", "expected"),
    [
        ("reference", "head", {"head.weight", "head.bias"}),
        (
            "bias",
            "head",
            {
                "head.linear.weight",
                "head.linear.bias",
                "head.item_bias.weight",
                "head.user_bias",
                "head.item_factors.weight",
                "head.user_factors",
            },
        ),
        ("bias", "user", {"head.user_bias", "head.user_factors"}),
        ("reference", "no_embeddings", None),
    ],
)
def test_adapted_parameter_choice(head, adapt, expected):
    learner = learner_for(small_config("sasrec", "melo", head, adapt=adapt))
    names = set(learner.adapted)
    if expected is not None:
        assert names == expected
    else:
        assert not any("embedding" in n for n in names) and "head.weight" in names
    assert set(learner.inner_lrs) - {"log_user_damping"} == {lr_key(n) for n in names}
    _, grads = meta_step(learner, small_batch(), 0)
    frozen = [n for n in grads if n.startswith("backbone.") and n[9:] not in names]
    assert frozen and all(torch.isfinite(grads[n]).all() for n in frozen)


def test_step_importance_anneals_onto_the_last_step():
    first = step_importance(3, 0, 100)
    assert first == pytest.approx([1 / 3] * 3)
    middle = step_importance(3, 50, 100)
    assert sum(middle) == pytest.approx(1.0) and middle[-1] > middle[0]
    assert step_importance(3, 100, 100) == [0.0, 0.0, 1.0]
    assert step_importance(3, 5, 0) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("skipped", [0, 3])
def test_gru_layer_is_torch_gru(skipped):
    """The hand-written cells (for vmap and double backward) compute torch.nn.GRU, also when
    dropped left padding is read as zeros from the layer's initial state."""
    torch.manual_seed(0)
    ours, reference = GRU(5, 4, num_layers=2), torch.nn.GRU(5, 4, num_layers=2, batch_first=True)
    with torch.no_grad():
        ours.h0.normal_()
        for layer in range(2):
            for kind, proj in (("ih", ours.input_proj[layer]), ("hh", ours.hidden_proj[layer])):
                proj.weight.copy_(getattr(reference, f"weight_{kind}_l{layer}"))
                proj.bias.copy_(getattr(reference, f"bias_{kind}_l{layer}"))
    x = torch.randn(3, 6, 5)
    padded = torch.cat([x.new_zeros(3, skipped, 5), x], 1)
    h0 = ours.h0[:, None].expand(2, 3, 4).contiguous()
    expected = reference(padded, h0)[0][:, skipped:]
    torch.testing.assert_close(ours(x, skipped), expected)


@pytest.mark.parametrize("length", [21, 8, 5])
def test_narm_attention_in_row_blocks_is_the_dense_one(length):
    """NARM scores only the causal pairs, in row blocks; the features are those of scoring every
    pair [L, L, D] and masking the later and padding keys."""
    narm = learner_for(small_config("narm", "melo")).backbone.eval()
    items = torch.randint(1, ITEMS + 1, (2, 3, length))
    items[0, :, :2] = 0  # left padding
    states = narm.gru(narm.embed(items))
    mixed = narm.query_proj(states).unsqueeze(-2) + narm.key_proj(states).unsqueeze(-3)
    scores = narm.score(torch.sigmoid(mixed)).squeeze(-1)
    weights = scores.masked_fill(~attention_mask(items, causal=True), 0.0)
    expected = torch.cat([weights @ states, states], dim=-1)
    torch.testing.assert_close(narm.features(items), expected)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_output_range_and_shapes(backbone):
    learner = learner_for(small_config(backbone, "melo", "reference"))
    items = torch.randint(0, ITEMS + 1, (2, 3, 8))
    items[..., -1] = 1  # the last position is always real
    pred = learner.backbone(items)
    assert pred.shape == items.shape
    assert (pred > 0.1).all() and (pred < 1.1).all()  # the reference head's range
    assert torch.allclose(learner.backbone(items[0, 0]), pred[0, 0])  # any leading dims


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", ["reference", "bias"])
def test_candidates_scored_from_one_context_match_their_windows(backbone, head):
    """What scoring a user's candidates computes (the causal backbones read the context once)
    equals each window `context + candidate` at its last position: left padding, a context of
    padding only, and per-task parameters under vmap (as inference runs it)."""
    model = learner_for(small_config(backbone, "melo", head)).backbone.double().eval()
    context = torch.randint(1, ITEMS + 1, (4, 7))  # a window of 8: context + candidate
    context[:, :3], context[0] = 0, 0
    candidates = torch.randint(1, ITEMS + 1, (4, 6))
    windows = torch.cat([context[:, None].expand(4, 6, 7), candidates[..., None]], -1)
    expected = model(windows)[..., -1]
    assert torch.allclose(model(context, candidates=candidates), expected, rtol=1e-12, atol=0)
    params = {name: p.expand(4, *p.shape) for name, p in model.named_parameters()}
    mapped = vmap(lambda p, c, x: functional_call(model, p, (c,), {"candidates": x}))
    assert torch.allclose(mapped(params, context, candidates), expected, rtol=1e-12, atol=0)


def test_bias_head_starts_as_the_item_bias_predictor_and_adapts_the_user_bias():
    learner = learner_for(small_config("gru4rec", "maml", inner_steps=1))
    learner.backbone.head.linear.weight.data.zero_()
    items = torch.randint(1, ITEMS + 1, (2, 8))
    expected = 0.7 + learner.backbone.head.item_bias.weight[items, 0]
    assert torch.allclose(learner.backbone(items), expected)
    assert learner.inner_lrs["head__user_bias"].tolist() == [0.5]  # meta.user_inner_lr
    batch = small_batch()
    local, rows = batch.with_local_items()
    fast = learner.adapt(rows, local, False)
    user_bias = fast[-1]["head.user_bias"]
    assert user_bias.shape == (len(batch),) and (user_bias != 0).all()  # one per task


@pytest.mark.parametrize("regime", ["maml", "melo"])
def test_newton_user_step_lands_on_the_damped_least_squares_fit(regime):
    """The prediction is linear in the user bias and factors, so one Newton step of lr 1 from 0
    minimises the (weighted) support loss + 1/2 damping |user|^2: its gradient there is 0."""
    config = small_config("gru4rec", regime, inner_steps=1, adapt="head", user_step="newton")
    config.model.sequence_term = False  # the user parameters are then the only ones that matter
    learner = learner_for(config)
    damping = learner.inner_lrs["log_user_damping"][0].exp()
    batch = small_batch()
    local, rows = batch.with_local_items()
    fast = learner.adapt(rows, local, False)[-1]
    user = {n: fast[n].detach().requires_grad_() for n in ("head.user_bias", "head.user_factors")}
    target = local.support_ratings / learner.scale
    weights = learner.weight_net(local.support_ratings, local.support_mask)
    pred = learner.forward_tasks({**learner.task_params(rows), **user}, local.support_items)
    terms = (pred - target) ** 2 * local.support_mask  # over the number of support positions
    terms = terms if weights is None else weights * terms
    loss = (terms.sum((-2, -1)) / local.support_mask.sum((-2, -1))).sum()
    penalty = 0.5 * (damping[0] * user["head.user_bias"] ** 2).sum()
    penalty = penalty + 0.5 * (damping[1] * user["head.user_factors"] ** 2).sum()
    grads = torch.autograd.grad(loss + penalty, list(user.values()))
    assert max(float(g.abs().max()) for g in grads) < 1e-8
    assert float(user["head.user_factors"].detach().abs().max()) > 1e-3  # it did move


def test_predictions_are_on_the_rating_scale_and_half_stars_work():
    config = small_config("gru4rec", "melo")
    levels = [0.5 * k for k in range(1, 11)]
    torch.manual_seed(0)
    learner = build_learner(config, ITEMS, levels)
    batch = small_batch(dtype=torch.float32)
    half = replace(batch, support_ratings=batch.support_ratings - 0.5 * batch.support_mask)
    weights = learner.weight_net(half.support_ratings, half.support_mask)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    pred = predict_targets(learner, half)
    assert pred.shape == batch.query_items.shape[:2]
    assert (pred > 0.5).all() and (pred < 5.5).all()


def test_softmax_encoder_weights_sum_to_window_length():
    config = small_config("sasrec", "melo")
    config.model.encoder_output = "softmax"
    learner = learner_for(config)
    batch = small_batch()
    weights = learner.weight_net(batch.support_ratings, batch.support_mask)
    assert torch.allclose(weights.sum(-1), batch.support_mask.sum(-1).to(weights.dtype))
    assert (weights[~batch.support_mask] == 0).all()


def test_task_mean_encoder_weights_average_one_over_each_task():
    config = small_config("sasrec", "melo")
    config.model.encoder_output = "task_mean"
    learner = learner_for(config)
    batch = small_batch()
    mask = batch.support_mask
    weights = learner.weight_net(batch.support_ratings, mask)
    mean = weights.sum((-2, -1)) / mask.sum((-2, -1))
    assert torch.allclose(mean, torch.ones_like(mean))
    assert (weights[~mask] == 0).all() and weights[mask].std() > 0  # redistributed, not flat


def test_class_balanced_weights_are_inverse_support_frequencies():
    """Checked against a plain count over each task's support ratings."""
    batch = small_batch(tasks=4)
    weights = ClassBalanced(LEVELS)(batch.support_ratings, batch.support_mask)
    for b in range(len(batch)):
        ratings, mask = batch.support_ratings[b], batch.support_mask[b]
        levels, counts = torch.unique(ratings[mask], return_counts=True)
        expected = torch.zeros_like(ratings)
        for value, count in zip(levels.tolist(), counts.tolist()):
            expected[(ratings == value) & mask] = mask.sum() / (len(levels) * count)
        assert torch.allclose(weights[b], expected)


def test_learned_rates_leave_out_the_recency_decay():
    learner = learner_for(small_config("gru4rec", "melo", recency=True))
    rates = inner_learning_rates(learner)
    assert "recency_decay" not in rates and "head.user_bias" in rates
    assert all(isinstance(values, list) for values in rates.values())
