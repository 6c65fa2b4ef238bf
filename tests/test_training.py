"""Local training: exact resume, checkpoints, metrics, reference points, config and CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct

import numpy as np
import pytest
import torch
from conftest import tiny_config

from melo_dist.cli import main
from melo_dist.config import LOWER_BOUNDS, Config, load_config
from melo_dist.data.dataset import load_dataset
from melo_dist.data.sampler import EpochSampler
from melo_dist.errors import InputError
from melo_dist.meta import learner_from_state
from melo_dist.training.baselines import (
    FACTOR_SHRINK,
    ONCE_SCALE,
    RECENCY_DECAY,
    USER_SHRINK,
    bias_statistics,
    factor_design,
    recency_weights,
    ridge,
)
from melo_dist.training.checkpoint import (
    BEST,
    LAST,
    METRICS,
    best_record,
    load_checkpoint,
    read_metrics,
)
from melo_dist.training.evaluation import (
    Targets,
    collect_targets,
    eval_batches,
    evaluate_checkpoints,
    evaluate_learner,
    model_batches,
    reference_points,
    reference_predictions,
    score,
    split_targets,
)
from melo_dist.training.loop import Interrupted, train, train_local
from melo_dist.training.run import TrainingRun, average_into, class_balanced_weights


class Crash(Exception):
    pass


def crash_after_iteration_3(message: str) -> None:
    if message.startswith("iter 3/"):  # logged right after the iteration-3 checkpoint
        raise Crash


@pytest.mark.parametrize("average", [0.0, 0.5], ids=["plain", "averaged"])
def test_resume_continues_exactly(synthetic_dir, tmp_path, average):
    def config(name: str) -> Config:
        config = tiny_config(synthetic_dir, tmp_path / name, validate_every=3)
        config.optim.average = average
        return config

    train_local(config("straight"), log=lambda message: None)
    with pytest.raises(Crash):
        train_local(config("resumed"), log=crash_after_iteration_3)
    messages = []
    train_local(config("resumed"), log=messages.append)
    assert any("resuming" in m and "iteration 3" in m for m in messages)

    a, b = (
        load_checkpoint(tmp_path / "straight" / LAST),
        load_checkpoint(tmp_path / "resumed" / LAST),
    )
    assert a["iteration"] == b["iteration"] == 6
    for weights in ("learner", "averaged") if average else ("learner",):
        for name, value in a[weights].items():
            assert torch.equal(value, b[weights][name]), f"{weights}: {name}"
    iterations = [
        json.loads(line)["iteration"]
        for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert iterations == [3, 6]  # nothing counted twice


def test_the_moving_average_ramps_its_decay_up_to_optim_average():
    averaged, learner = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    averaged.weight.data.fill_(0.0)
    learner.weight.data.fill_(1.0)
    average_into(averaged, learner, 0.9, step=1)  # decay (1 + 1) / (10 + 1), below 0.9
    assert averaged.weight.item() == pytest.approx(9 / 11)
    average_into(averaged, learner, 0.9, step=1000)  # decay 0.9
    assert averaged.weight.item() == pytest.approx(9 / 11 + 0.1 * 2 / 11)


def test_averaged_parameters_are_what_validation_and_checkpoints_score(synthetic_dir, tmp_path):
    plain = tiny_config(synthetic_dir, tmp_path / "plain")
    averaged = tiny_config(synthetic_dir, tmp_path / "averaged")
    averaged.optim.average = 0.5
    for config in (plain, averaged):
        train_local(config, log=lambda message: None)
    a, b = (load_checkpoint(tmp_path / name / LAST) for name in ("plain", "averaged"))
    assert "averaged" not in a
    for name, value in a["learner"].items():  # the average only watches the training
        assert torch.equal(value, b["learner"][name]), name
    assert any(not torch.equal(b["averaged"][n], b["learner"][n]) for n in b["learner"])
    run = TrainingRun(averaged, load_dataset(averaged.data))
    scored = evaluate_learner(learner_from_state(b), run.valid_batches, run.valid_targets)
    assert scored["rmse"] == pytest.approx(read_metrics(tmp_path / "averaged")[-1]["valid_rmse"])


def test_a_run_folder_left_by_a_crash_resumes(synthetic_dir, tmp_path, capsys):
    """What a kill can leave: a metrics record past last.pt (the record is written first) and
    a torn last line. The resume drops both and continues; no temporary file is left."""
    out = tmp_path / "run"
    train_local(tiny_config(synthetic_dir, out, validate_every=3), log=lambda message: None)
    straight = load_checkpoint(out / LAST)
    records = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in records] == [3, 6]
    # the state of a kill during the second checkpoint: record 6 written, last.pt still at 3
    crashed = tmp_path / "crashed"
    with pytest.raises(Crash):
        train_local(
            tiny_config(synthetic_dir, crashed, validate_every=3), log=crash_after_iteration_3
        )
    with open(crashed / "metrics.jsonl", "a") as handle:
        handle.write(records[1] + "\n" + records[1][:17])  # a record past last.pt, a torn line
    messages = []
    train_local(tiny_config(synthetic_dir, crashed, validate_every=3), log=messages.append)
    assert any("torn last line" in m for m in capsys.readouterr().err.splitlines())
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in lines] == [3, 6]
    resumed = load_checkpoint(crashed / LAST)
    for name, value in straight["learner"].items():
        assert torch.equal(value, resumed["learner"][name]), name
    assert not [p.name for p in crashed.iterdir() if p.name.startswith(".")]  # no temp files
    (crashed / "metrics.jsonl").write_text('{"iteration": 3}\nnot json\n' + lines[-1] + "\n")
    with pytest.raises(InputError, match=r"metrics.jsonl:2: is not a metrics record"):
        best_record(crashed)


def test_crashes_between_a_runs_first_writes_leave_it_consistent(synthetic_dir, tmp_path):
    """A kill after the first record but before the first last.pt: the restart trains from
    the start and counts that record once. A kill between an improving record's last.pt and
    best.pt: the resume makes best.pt that state, so best.pt and the best record agree."""
    straight = tmp_path / "straight"
    train_local(tiny_config(synthetic_dir, straight, validate_every=3), log=lambda m: None)
    records = (straight / METRICS).read_text().splitlines()

    early = tmp_path / "early"  # the record of iteration 3 written, nothing else
    early.mkdir()
    (early / METRICS).write_text(records[0] + "\n")
    train_local(tiny_config(synthetic_dir, early, validate_every=3), log=lambda m: None)
    assert [json.loads(r)["iteration"] for r in (early / METRICS).read_text().splitlines()] == [
        3,
        6,
    ]

    late = tmp_path / "late"  # an improving iteration 6: record and last.pt written, not best.pt
    with pytest.raises(Crash):
        train_local(tiny_config(synthetic_dir, late, validate_every=3), log=crash_after_iteration_3)
    assert load_checkpoint(late / BEST)["iteration"] == 3
    shutil.copy(straight / LAST, late / LAST)
    first, second = (json.loads(r) for r in records)
    second["valid_rmse"] = first["valid_rmse"] - 0.1
    (late / METRICS).write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    train_local(tiny_config(synthetic_dir, late, validate_every=3), log=lambda m: None)
    assert load_checkpoint(late / BEST)["iteration"] == best_record(late)["iteration"] == 6


def test_sigterm_checkpoints_the_current_iteration_and_the_run_resumes(synthetic_dir, tmp_path):
    """SIGTERM mid-run: the iteration in progress finishes, its checkpoint is written (not the
    last validate_every boundary), and re-running continues to the straight run's parameters."""
    train_local(
        tiny_config(synthetic_dir, tmp_path / "straight", validate_every=3), log=lambda m: None
    )

    sent = []

    def terminate_at_iteration_4(message: str) -> None:
        if message.startswith("iter 4/") and not sent:  # (the stop logs "iter 4/" again)
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    out = tmp_path / "stopped"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at iteration 4") as stopped:
        train_local(tiny_config(synthetic_dir, out, validate_every=3), log=terminate_at_iteration_4)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert load_checkpoint(out / LAST)["iteration"] == 4
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").open()] == [3, 4]
    assert signal.getsignal(signal.SIGTERM) == handler  # the process's handler is restored
    train_local(tiny_config(synthetic_dir, out, validate_every=3), log=lambda m: None)
    a, b = load_checkpoint(tmp_path / "straight" / LAST), load_checkpoint(out / LAST)
    for name, value in a["learner"].items():
        assert torch.equal(value, b["learner"][name]), name


def test_max_minutes_stops_cleanly_with_a_checkpoint(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--set", f"data.path={synthetic_dir}", "--set", f"run.out={out}"]
    args += ["--set", "model.dim=8", "--set", "model.heads=2", "--set", "data.valid_users=30"]
    assert main([*args, "--max-minutes", "0.00001"]) == 0  # past the budget after iteration 1
    assert load_checkpoint(out / LAST)["iteration"] == 1
    assert "--max-minutes 1e-05 reached" in capsys.readouterr().err
    assert main([*args, "--max-minutes", "0"]) == 2
    assert "--max-minutes takes minutes > 0, got 0" in capsys.readouterr().err


def test_class_balanced_outer_weights_give_every_level_the_same_total(synthetic_dir):
    data = load_dataset(load_config(None, [f"data.path={synthetic_dir}"]).data)
    weights = class_balanced_weights(data)
    ratings = torch.from_numpy(data.train.ratings)
    per_rating = weights[torch.searchsorted(torch.tensor(data.levels), ratings)]
    assert float(per_rating.mean()) == pytest.approx(1.0, rel=1e-5)
    totals = [float(per_rating[ratings == level].sum()) for level in data.levels]
    assert max(totals) == pytest.approx(min(totals), rel=1e-4)  # each level weighs the same
    config = tiny_config(synthetic_dir, "unused", outer_loss="class_balanced")
    assert torch.equal(TrainingRun(config, data).learner.outer_weights, weights)


def test_partly_balanced_outer_weights_interpolate_between_mse_and_balanced(synthetic_dir):
    data = load_dataset(load_config(None, [f"data.path={synthetic_dir}"]).data)
    ratings = torch.from_numpy(data.train.ratings)
    shares = torch.stack([(ratings == level).double().mean() for level in data.levels])
    assert torch.allclose(class_balanced_weights(data, 0.0), torch.ones(len(shares)))
    half = class_balanced_weights(data, 0.5).double()
    assert float((half * shares).sum()) == pytest.approx(1.0, rel=1e-5)  # mean weight 1
    ratios = half / half[0]
    assert torch.allclose(ratios, (shares / shares[0]) ** -0.5, rtol=1e-5)
    config = tiny_config(synthetic_dir, "unused", outer_loss="class_balanced")
    config.meta.outer_balance = 0.5
    assert torch.equal(TrainingRun(config, data).learner.outer_weights, half.float())


def test_training_writes_checkpoints_and_improves(synthetic_dir, tmp_path):
    config = tiny_config(synthetic_dir, tmp_path / "run", iterations=12, validate_every=3)
    best = train_local(config, log=lambda message: None)
    state = load_checkpoint(tmp_path / "run" / BEST)
    assert state["best_rmse"] == pytest.approx(best["valid_rmse"])
    assert set(state) >= {
        "learner",
        "optimizers",
        "schedulers",
        "iteration",
        "config",
        "manifest_sha256",
    }
    records = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in records] == [3, 6, 9, 12]
    assert records[-1]["valid_rmse"] < records[0]["valid_rmse"]  # the loss of 4 tasks is noisy
    # a run folder holding another config is refused rather than silently mixed
    config.optim.lr = 0.5
    with pytest.raises(InputError, match=r"different config"):
        train_local(config, log=lambda message: None)
    # a run stopped before its first checkpoint: its config.yaml is checked too
    for name in (LAST, BEST, METRICS):
        (tmp_path / "run" / name).unlink()
    with pytest.raises(InputError, match=r"optim.lr was 0.001, now 0.5"):
        train_local(config, log=lambda message: None)


def test_every_regime_trains_and_evaluates(synthetic_dir, tmp_path):
    paths = []
    for regime in ("basic", "maml", "melo", "focal", "class_balanced", "stats_mlp"):
        config = tiny_config(
            synthetic_dir, tmp_path / regime, iterations=3, validate_every=3, regime=regime
        )
        train_local(config, log=lambda message: None)
        paths.append(str(tmp_path / regime))
    results = evaluate_checkpoints(paths, "test")
    assert len(results) == 6 + 7  # every regime plus the seven reference points
    users = {m["users"] for m in results.values()}
    assert users == {120}  # the same targets for everyone
    for metrics in results.values():
        assert 0 < metrics["mae"] <= metrics["rmse"] < 4


def test_weight_decay_shrinks_only_the_sequence_models_weights(synthetic_dir, tmp_path):
    """With zero gradients AdamW's step is the decay alone: lr * weight_decay of each of the
    sequence model's weights; the bias head's bias model, biases and norms do not move."""
    config = tiny_config(synthetic_dir, tmp_path)
    config.model.user_factors, config.optim.weight_decay = 2, 0.5
    run = TrainingRun(config, load_dataset(config.data))
    before = {name: p.detach().clone() for name, p in run.learner.named_parameters()}
    run.apply({name: torch.zeros_like(p) for name, p in before.items()}, 0.0)
    shrunk = {
        "backbone.item_embedding.weight",
        "backbone.gru.input_proj.0.weight",
        "backbone.head.linear.weight",
    }
    kept = {"backbone.head.item_bias.weight", "backbone.head.item_factors.weight"}
    kept |= {"backbone.gru.input_proj.0.bias", "backbone.head.user_factors"}
    lr = config.optim.lr
    for name in shrunk:
        assert torch.allclose(run.learner.get_parameter(name), before[name] * (1 - lr * 0.5))
    for name in kept:
        assert torch.equal(run.learner.get_parameter(name), before[name]), name


def test_a_non_finite_meta_loss_stops_training(synthetic_dir, tmp_path):
    config = tiny_config(synthetic_dir, tmp_path)
    data = load_dataset(config.data)
    run = TrainingRun(config, data)
    loss, grads = run.gradients(next(EpochSampler(data.train, data.spec, 0, 4).batches(0)))
    before = {name: p.detach().clone() for name, p in run.learner.named_parameters()}
    with pytest.raises(FloatingPointError, match="meta-loss became nan at iteration 1"):
        run.apply(grads, float("nan"))
    assert run.iteration == 0
    for name, param in run.learner.named_parameters():
        assert torch.equal(param, before[name]), name  # no step was taken
    name = next(iter(grads))  # a finite loss with a non-finite gradient stops it too
    with pytest.raises(FloatingPointError, match=f"gradient of {name} became non-finite"):
        run.apply({**grads, name: torch.full_like(grads[name], float("inf"))}, float(loss))
    for name, param in run.learner.named_parameters():
        assert torch.equal(param, before[name]), name
    run.apply(grads, float(loss))
    assert run.iteration == 1


def test_factor_reference_points_are_per_user_weighted_ridge_fits_and_beat_the_bias_model(
    synthetic_dir,
):
    data = load_dataset(load_config(None, [f"data.path={synthetic_dir}"]).data)
    targets = collect_targets(list(eval_batches(data.split("test"), data.spec, 0)))
    mu, item_bias = bias_statistics(data.train, data.num_items)
    design, reg = factor_design(data.train, data.num_items)
    assert np.array_equal(reg, [USER_SHRINK] + [FACTOR_SHRINK] * (design.shape[1] - 1))
    users = np.repeat(np.arange(len(targets.item)), targets.support_count.astype(int))
    items = np.concatenate(targets.support_items)
    residual = np.concatenate(targets.support_ratings) - mu - item_bias[items]
    ages = np.concatenate(targets.support_ages)
    assert ages.min() >= 1 and len(ages) == len(items)
    weight = recency_weights(ages, RECENCY_DECAY)
    fitted = ridge(users, len(targets.item), design[items], residual, reg, weight)
    for user in (0, 7, 33):  # the batched ridge == one user's weighted normal equations
        x, y, w = design[items[users == user]], residual[users == user], weight[users == user]
        expected = np.linalg.solve(x.T @ (w[:, None] * x) + np.diag(reg), x.T @ (w * y))
        np.testing.assert_allclose(fitted[user], expected, atol=1e-8)
        assert w.max() == 1.0 and w.min() < 1.0  # the target's neighbour counts most
    points = reference_predictions(data.train, targets, data.num_items)
    np.testing.assert_allclose(
        points["factor + recency"],
        mu + item_bias[targets.item] + np.einsum("uqk,uk->uq", design[targets.item], fitted),
    )
    for user in (0, 7, 33):  # once: each support position (age) once, shrinks / ONCE_SCALE
        mine = users == user
        _, first = np.unique(ages[mine], return_index=True)
        x, y = design[items[mine][first]], residual[mine][first]
        w = ONCE_SCALE * weight[mine][first]
        assert len(first) < mine.sum()  # the windows overlap: some positions repeat
        solved = np.linalg.solve(x.T @ (w[:, None] * x) + np.diag(reg), x.T @ (w * y))
        np.testing.assert_allclose(
            points["factor + recency, once"][user],
            mu + item_bias[targets.item[user]] + design[targets.item[user]] @ solved,
        )
    scores = reference_points(data.train, targets, data.num_items)
    assert scores["factor model"]["rmse"] < scores["bias model"]["rmse"]  # users have tastes


def test_a_model_is_scored_on_its_own_support_windows_and_the_same_targets(synthetic_dir):
    sampled = load_config(None, [f"data.path={synthetic_dir}"])
    history = load_config(None, [f"data.path={synthetic_dir}", "data.support_windows=history"])
    data, batches, _ = split_targets(history, "test", targets_per_user=2)
    assert batches[0].support_items.shape[1] == sampled.data.support  # references: sampled
    assert model_batches(sampled, data, "test", batches, 2) is batches
    own = model_batches(history, data, "test", batches, 2)
    assert all(b.support_items.shape[1] == 1 for b in own)
    assert torch.equal(
        torch.cat([b.query_items for b in own]), torch.cat([b.query_items for b in batches])
    )


def test_split_targets_score_each_user_on_its_last_interactions(synthetic_dir):
    config = load_config(None, [f"data.path={synthetic_dir}"])
    data, _, targets = split_targets(config, "test", targets_per_user=3)
    rows = data.split("test")
    assert len(targets.item) == 3 * len(rows)  # every synthetic user has >= 4 interactions
    for k in range(3):  # copy k of user u is scored on u's k-th last interaction
        last = rows.offsets[1:] - 1 - k
        block = slice(k * len(rows), (k + 1) * len(rows))
        assert np.array_equal(targets.item[block, 0], rows.items[last])
        assert np.array_equal(targets.rating[block, 0], rows.ratings[last])


def test_score_aggregates_per_user_then_over_users():
    rating = np.array([[5.0, 5.0, 5.0], [1.0, 1.0, 0.0]])
    targets = Targets(
        rating=rating,
        item=np.ones_like(rating, dtype=int),
        valid=np.array([[True, True, True], [True, True, False]]),
        support_sum=np.zeros(2),
        support_count=np.zeros(2),
        support_items=[],
        support_ratings=[],
        support_ages=[],
    )
    pred = np.array([[4.0, 5.0, 5.0], [3.0, 1.0, 9.0]])  # the invalid slot must not count
    metrics = score(pred, targets)
    user_mse = np.array([1 / 3, 4 / 2])
    assert metrics["rmse"] == pytest.approx(np.sqrt(user_mse.mean()))
    assert metrics["mae"] == pytest.approx(np.mean([1 / 3, 2 / 2]))
    assert metrics["rmse_5"] == pytest.approx(np.sqrt(1 / 3))
    assert metrics["rmse_1"] == pytest.approx(np.sqrt(2.0))
    assert metrics["users_1"] == metrics["users_5"] == 1


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(InputError, match=r"model.backbone"):
        load_config(None, ["model.backbone=lstm"])
    with pytest.raises(InputError, match=r"data.support_windows .*sampled"):
        load_config(None, ["data.support_windows=all"])
    with pytest.raises(InputError, match=r"meta.adapt must be .* with model.head=reference"):
        load_config(None, ["model.head=reference", "meta.adapt=user"])
    with pytest.raises(InputError, match=r"--set: meta.inner_steps expects int"):
        load_config(None, ["meta.inner_steps=three"])
    with pytest.raises(InputError, match=r"--set: meta: unknown key\(s\) \['inner_step'\]"):
        load_config(None, ["meta.inner_step=3"])
    with pytest.raises(InputError, match=r"--set: unknown section\(s\) \['metaa'\]"):
        load_config(None, ["metaa.regime=melo"])
    with pytest.raises(InputError, match=r"section.key=value"):
        load_config(None, ["iterations=3"])
    file = tmp_path / "file.yaml"  # a bad override names the --set, not the file it lands in
    file.write_text("meta:\n  recency: true\n")
    with pytest.raises(InputError, match=r"--set: meta.recency expects bool, got 2") as error:
        load_config(file, ["meta.recency=2"])
    assert "file.yaml" not in str(error.value)
    file.write_text("meta:\n  recency: 2\n")
    with pytest.raises(InputError, match=r"file.yaml: meta.recency expects bool"):
        load_config(file)
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta:\n  regime: melo\n  inner_steps: [1\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("meta:\n  regime: maml\noptim:\n  lr: 1e-4\n")
    config = load_config(good, ["meta.inner_steps=5"])
    assert (config.meta.regime, config.meta.inner_steps, config.optim.lr) == ("maml", 5, 1e-4)
    empty_section = tmp_path / "empty.yaml"
    empty_section.write_text("data:\nmeta: {regime: maml}\n")  # `data:` alone: an empty section
    assert load_config(empty_section, ["data.path=elsewhere"]).data.path == "elsewhere"
    scalar_section = tmp_path / "scalar.yaml"
    scalar_section.write_text("data: 5\n")
    with pytest.raises(InputError, match=r"scalar.yaml: a config file must be a mapping"):
        load_config(scalar_section)


def test_every_numeric_setting_is_range_checked_in_one_place():
    numeric = [
        f"{section}.{name}"
        for section, values in Config().to_dict().items()
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    assert sorted(numeric) == sorted(key for key, _, _ in LOWER_BOUNDS)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.heads=0", "model.heads must be >= 1, got 0"),
        ("run.log_every=0", "run.log_every must be >= 1"),
        ("optim.lr=-0.001", "optim.lr must be > 0"),
        ("optim.encoder_lr=0", "optim.encoder_lr must be > 0"),
        ("data.valid_users=-1", "data.valid_users must be >= 0"),
        ("model.dim=30", "model.dim must be divisible by model.heads"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("meta.inner_lr=inf", "meta.inner_lr must be a finite number, got inf"),
        ("meta.outer_balance=-0.5", "meta.outer_balance must be >= 0"),
    ],
)
def test_out_of_range_settings_exit_2_naming_the_key(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(["train", "--set", setting, "--set", f"run.out={out}"]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--workers", "-1"],
        ["--workers", "2", "--max-failures", "-1"],
        ["--workers", "2", "--cpus-per-worker", "0"],
        ["--max-minutes", "-1"],
    ],
)
def test_negative_worker_flags_exit_2(tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert main(["train", *flag, "--set", f"run.out={out}"]) == 2
    error = capsys.readouterr().err
    assert flag[-2] in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_use_gpu_without_a_gpu_exits_2_saying_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--use-gpu", "--set", f"run.out={out}"]) == 2
    error = capsys.readouterr().err
    assert "--use-gpu" in error and "no CUDA device" in error
    assert len(error.strip().splitlines()) == 1 and not out.exists()


def scalar_tags(path) -> set[str]:
    """The scalar tags of a TensorBoard event file (TFRecords of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, tags, offset = path.read_bytes(), set(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        tags |= {value.tag for value in event.summary.value}
        offset += 12 + length + 4
    return tags


def test_a_multi_step_phase_as_long_as_the_run_is_refused(synthetic_dir, tmp_path):
    config = load_config(None, ["optim.iterations=500"])  # the default phase is 1000 iterations
    with pytest.raises(InputError, match=r"meta.multi_step_iterations must be below optim"):
        config.check_training()
    with pytest.raises(InputError, match=r"meta.multi_step_iterations"):  # before any work
        train_local(tiny_config(synthetic_dir, tmp_path / "run", 4, multi_step_iterations=4))
    assert not (tmp_path / "run").exists()
    Config.from_dict(config.to_dict())  # a checkpoint's config still loads as it was
    load_config(None, ["optim.iterations=500", "meta.multi_step_iterations=0"]).check_training()
    load_config(None, ["optim.iterations=500", "meta.regime=basic"]).check_training()


def test_cli_train_and_evaluate(synthetic_dir, tmp_path, capsys):
    sets = [
        f"--set={k}={v}"
        for k, v in {
            "data.path": synthetic_dir,
            "data.valid_users": 10_000,  # more than there are: all of them, and it says so
            "model.backbone": "gru4rec",
            "model.dim": 8,
            "meta.tasks_per_batch": 4,
            "meta.inner_steps": 1,
            "optim.iterations": 2,
            "meta.multi_step_iterations": 1,
            "run.validate_every": 2,
            "run.out": tmp_path / "run",
        }.items()
    ]
    assert main(["train", *sets]) == 0
    printed = capsys.readouterr()
    assert printed.out == ""  # people read stderr; JSON only with --json
    assert "model.dim=8" in printed.err and "meta.inner_steps=1" in printed.err
    assert "done: best valid RMSE" in printed.err and "last" in printed.err
    assert "validating on all of them" in printed.err
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    assert {"valid/rmse", "loss"} <= scalar_tags(events)  # `tensorboard --logdir runs/`
    written = load_config(tmp_path / "run" / "config.yaml")  # the resolved config, in full
    assert (
        written.to_dict() == load_config(None, [s.removeprefix("--set=") for s in sets]).to_dict()
    )

    assert main(["train", *sets, "--set=optim.iterations=4", "--json"]) == 2  # other config
    assert load_config(tmp_path / "run" / "config.yaml").optim.iterations == 2  # left alone
    capsys.readouterr()
    sets = [*sets[:-1], f"--set=run.out={tmp_path / 'json'}"]
    assert main(["train", *sets, "--json"]) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert done["event"] == "train_done" and done["last"]["iteration"] == 2
    assert done["iteration"] == done["last"]["iteration"]  # the best record, at the top level

    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "bias model" in out and "users per class" in out and "{" not in out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {line["model"] for line in lines} >= {"global mean", "item mean", "support mean"}
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing")]) == 2


def test_bias_head_alone_learns_the_bias_model(synthetic_dir, tmp_path):
    """With the sequence term off and the item biases started from 0, the outer loop has to
    learn every item's effect and the inner loop each user's offset: together they must reach
    the bias reference point (within 1 %); without the inner loop it does not."""
    config = tiny_config(
        synthetic_dir, tmp_path, 300, tasks=16, regime="maml", adapt="head", inner_steps=1
    )
    config.model.sequence_term, config.optim.lr = False, 0.01
    data = load_dataset(config.data)
    run = TrainingRun(config, data)
    run.learner.backbone.head.item_bias.weight.data.zero_()
    sampler = EpochSampler(data.train, data.spec, 0, config.meta.tasks_per_batch)
    train(run, sampler.batches(0), save=lambda losses, seconds: None, log=lambda m: None)
    batches = list(eval_batches(data.split("test"), data.spec, config.data.eval_seed))
    targets = collect_targets(batches)
    bias_model = reference_points(data.train, targets, data.num_items)["bias model"]["rmse"]
    assert evaluate_learner(run.learner, batches, targets)["rmse"] < 1.01 * bias_model
    for rate in run.learner.inner_lrs.values():  # no adaptation: the item biases alone
        rate.data.zero_()
    assert evaluate_learner(run.learner, batches, targets)["rmse"] > 1.02 * bias_model
