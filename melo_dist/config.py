"""One typed, validated configuration (data, model, meta, optim, run), YAML + `key=value` overrides.

Defaults are the MELO reference's (DESIGN §2). Plain dataclasses: picklable for Ray, printable,
and a bad value is an error naming its key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from melo_dist.errors import InputError
from melo_dist.storage import normalised

BACKBONES = ("gru4rec", "narm", "sasrec", "bert4rec")
REGIMES = ("basic", "maml", "melo", "focal", "class_balanced", "stats_mlp")
ADAPT = ("all", "no_embeddings", "head", "user")
SUPPORT_WINDOWS = ("sampled", "history")
ENCODER_OUTPUTS = ("abs", "softmax", "task_mean")
HEADS = ("reference", "bias")
QUERY_LOSSES = ("last", "all")
USER_STEPS = ("gradient", "newton")
OUTER_LOSSES = ("mse", "class_balanced", "encoder_balanced")
# Every numeric setting's lower bound: (key, bound, whether the bound itself is allowed).
LOWER_BOUNDS = [
    ("data.window", 3, True),
    ("data.support", 1, True),
    ("data.query", 1, True),
    ("data.valid_users", 0, True),  # 0 = all
    ("data.valid_targets", 1, True),
    ("data.eval_seed", 0, True),
    ("model.user_factors", 0, True),
    ("model.dim", 1, True),
    ("model.dropout", 0, True),
    ("model.gru_layers", 1, True),
    ("model.blocks", 1, True),
    ("model.heads", 1, True),
    ("model.ffn", 1, True),
    ("model.max_length", 1, True),
    ("model.encoder_embed", 1, True),
    ("model.encoder_hidden", 1, True),
    ("meta.inner_steps", 1, True),
    ("meta.inner_lr", 0, True),
    ("meta.user_inner_lr", 0, False),
    ("meta.user_damping", 0, False),
    ("meta.tasks_per_batch", 1, True),
    ("meta.multi_step_iterations", 0, True),
    ("meta.outer_balance", 0, True),
    ("meta.recency_decay", 0, True),
    ("optim.iterations", 1, True),
    ("optim.lr", 0, False),
    ("optim.lr_min", 0, True),
    ("optim.clip", 0, False),
    ("optim.encoder_lr", 0, False),
    ("optim.encoder_lr_min", 0, True),
    ("optim.lslr_lr", 0, True),
    ("optim.weight_decay", 0, True),
    ("optim.average", 0, True),
    ("run.seed", 0, True),
    ("run.validate_every", 1, True),
    ("run.log_every", 1, True),
    ("run.threads", 0, True),
]


@dataclass
class DataConfig:
    path: str = "data/synthetic"  # a folder written by `melo-dist prepare`
    window: int = 30  # longest window L
    support: int = 25  # most support sub-windows per task (support_windows: sampled)
    # sampled: the reference's random sub-windows of the history before the target (a rating
    # then counts once per window holding it); history: one window, the whole history, each
    # rating once
    support_windows: str = "sampled"
    query: int = 3  # most query suffixes per task
    valid_users: int = 500  # fixed validation users (first N of tasks-valid), 0 = all
    valid_targets: int = 1  # targets per validation user: its last, then earlier interactions
    # (more = steadier model selection; test users are always scored on their last)
    eval_seed: int = 0  # seeds the fixed evaluation windows


@dataclass
class ModelConfig:
    backbone: str = "sasrec"  # gru4rec | narm | sasrec | bert4rec
    head: str = "bias"  # bias: global + item + user bias + linear | reference: 0.1 + sigmoid
    sequence_term: bool = True  # bias head: false drops linear(features), the bias model alone
    user_factors: int = 0  # bias head: k > 0 adds user factors (adapted) . item factors
    dim: int = 32  # embedding and hidden size
    dropout: float = 0.1
    gru_layers: int = 2  # GRU4Rec depth
    blocks: int = 2  # SASRec / BERT4Rec
    heads: int = 4
    ffn: int = 128
    max_length: int = 30  # learned positions; must cover data.window
    encoder_embed: int = 16  # task-state encoder: rating embedding size
    encoder_hidden: int = 32  # task-state encoder: LSTM size (also the stats net's MLP)
    encoder_output: str = "abs"  # abs | softmax | task_mean (abs, divided by the task's mean)
    encoder_error: bool = False  # the encoder also reads the initialisation's error per rating


@dataclass
class MetaConfig:
    regime: str = "melo"  # basic | maml | melo | focal | class_balanced | stats_mlp
    inner_steps: int = 3
    first_order: bool = False  # second order by default, as the reference
    inner_lr: float = 1e-3  # LSLR initial value (per parameter, per step, learned)
    user_inner_lr: float = 0.5  # LSLR initial value of the bias head's user bias and factors
    # (0.5: one plain-MSE step moves the user bias to the support's mean residual)
    user_step: str = "gradient"  # gradient | newton: how the inner loop steps the user parameters
    user_damping: float = 1.0  # newton: initial damping (learned), the user bias's and factors'
    adapt: str = "all"  # all | no_embeddings | head | user (the bias head's user bias and
    # factors only: the sequence term and item rows stay the meta-learned ones for every user)
    query_loss: str = "last"  # outer loss on each query's target (last) or every position (all)
    recency: bool = False  # weight each support position's inner loss by exp(-decay * age),
    # age = interactions between it and the target (mean 1 per task), times the regime's
    # weights; the decay is learned with the inner lrs, from recency_decay
    recency_decay: float = 0.1
    outer_loss: str = "mse"  # mse | class_balanced: each target weighted 1 / (K * its level's
    # share of the training ratings), so every rating level weighs the same in the outer loss |
    # encoder_balanced: the recommender and inner lrs learn from plain MSE, MELO's task-state
    # encoder from the class-balanced loss
    outer_balance: float = 1.0  # *_balanced: weights share^-outer_balance (mean 1), from
    # 0 (plain MSE) to 1 (every level the same); 0.5 = square-root balancing
    tasks_per_batch: int = 16  # the meta-batch (global, across workers)
    multi_step_iterations: int = 1000  # MAML++ multi-step loss for the first N iterations


@dataclass
class OptimConfig:
    iterations: int = 2000
    lr: float = 1e-3  # recommender Adam, cosine-decayed to lr_min
    lr_min: float = 1e-4
    clip: float = 5.0  # grad-norm clip on the recommender
    encoder_lr: float = 0.1  # weight-net Adam, cosine-decayed to encoder_lr_min
    encoder_lr_min: float = 0.01
    lslr_lr: float = 1e-3  # inner learning rates' Adam
    # > 0: decoupled weight decay (AdamW) on the sequence model's weight matrices and
    # embeddings, not on the bias head's biases and factors
    weight_decay: float = 0.0
    # > 0: validation, checkpoint selection and every later use score an exponential moving
    # average of the parameters (Polyak averaging) with this decay; 0 = the parameters as is
    average: float = 0.0


@dataclass
class RunConfig:
    out: str = "runs/default"  # checkpoints and metrics
    seed: int = 0
    validate_every: int = 50
    log_every: int = 10
    threads: int = 0  # torch threads, 0 = leave as is
    init_from: str = ""  # a `basic` checkpoint whose embeddings initialise this run


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        """Every setting in its range, or an InputError naming the key (no traceback later).
        A URI gets one spelling (`storage.normalised`): it names one run."""
        self.data.path, self.run.out = normalised(self.data.path), normalised(self.run.out)
        self.run.init_from = normalised(self.run.init_from)
        for key, minimum, inclusive in LOWER_BOUNDS:
            value = self.get(key)
            if not math.isfinite(value):
                raise InputError(f"config key {key} must be a finite number, got {value!r}")
            if value < minimum or (value == minimum and not inclusive):
                expected = f"{'>=' if inclusive else '>'} {minimum}"
                raise InputError(f"config key {key} must be {expected}, got {value!r}")
        checks = [
            ("model.backbone", self.model.backbone in BACKBONES, f"one of {BACKBONES}"),
            ("meta.regime", self.meta.regime in REGIMES, f"one of {REGIMES}"),
            ("meta.adapt", self.meta.adapt in ADAPT, f"one of {ADAPT}"),
            (
                "data.support_windows",
                self.data.support_windows in SUPPORT_WINDOWS,
                f"one of {SUPPORT_WINDOWS}",
            ),
            ("model.head", self.model.head in HEADS, f"one of {HEADS}"),
            ("meta.query_loss", self.meta.query_loss in QUERY_LOSSES, f"one of {QUERY_LOSSES}"),
            ("meta.user_step", self.meta.user_step in USER_STEPS, f"one of {USER_STEPS}"),
            ("meta.outer_loss", self.meta.outer_loss in OUTER_LOSSES, f"one of {OUTER_LOSSES}"),
            (
                "model.encoder_output",
                self.model.encoder_output in ENCODER_OUTPUTS,
                f"one of {ENCODER_OUTPUTS}",
            ),
            ("model.dim", self.model.dim % self.model.heads == 0, "divisible by model.heads"),
            ("model.dropout", self.model.dropout < 1, "< 1"),
            ("optim.average", self.optim.average < 1, "< 1"),
            ("model.max_length", self.model.max_length >= self.data.window, ">= data.window"),
            (
                "meta.adapt",
                self.meta.adapt != "user" or self.model.head == "bias",
                "all, no_embeddings or head with model.head=reference (no user parameters)",
            ),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise InputError(f"config key {key} must be {expected}, got {self.get(key)!r}")
        return self

    def check_training(self) -> None:
        """What only a run about to train needs (a checkpoint's config loads as it was): the
        MAML++ multi-step phase ends before the run does, or is off (0)."""
        multi, total = self.meta.multi_step_iterations, self.optim.iterations
        if self.meta.regime != "basic" and multi >= total > 0 and multi:
            raise InputError(
                f"config key meta.multi_step_iterations must be below optim.iterations "
                f"({total}), or 0: the MAML++ multi-step phase would last the whole run (the "
                f"reference: half of it), got {multi}"
            )

    def check_workers(self, workers: int, name: str = "the number of workers") -> None:
        """The meta-batch must split evenly: every worker adapts the same number of tasks."""
        if self.meta.tasks_per_batch % workers:
            raise InputError(
                f"meta.tasks_per_batch ({self.meta.tasks_per_batch}) must be a multiple of "
                f"{name} ({workers})"
            )

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changed_settings(self) -> list[str]:
        """`section.key=value` for every setting that differs from the reference defaults."""
        defaults = flat_settings(Config().to_dict())
        return [
            f"{key}={value}"
            for key, value in flat_settings(self.to_dict()).items()
            if value != defaults[key]
        ]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        return cls(**cls.sections(raw, source)).validate()

    @classmethod
    def sections(cls, raw: dict, source: str) -> dict[str, Any]:
        """Each section of a raw mapping built and type-checked, an unknown section or key named
        after `source` (the checks across keys are `validate`'s)."""
        if not isinstance(raw, dict):
            raise InputError(f"{source} must be a mapping of sections")
        sections = {}
        for section, section_type in get_type_hints(cls).items():
            values = raw.get(section) or {}
            if not isinstance(values, dict):
                raise InputError(f"{source}: section {section!r} must be a mapping")
            sections[section] = build_section(section_type, values, f"{source}: {section}")
        unknown = set(raw) - set(sections)
        if unknown:
            raise InputError(
                f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}"
            )
        return sections


def build_section(section_type: type, values: dict, where: str) -> Any:
    hints = get_type_hints(section_type)
    unknown = set(values) - set(hints)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(hints)}")
    return section_type(**{k: coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def coerce(value: Any, kind: type, key: str) -> Any:
    """Check (and gently convert) one value to its declared type, naming the key on failure."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        return "" if value is None else str(value)
    raise InputError(f"config key {key} expects {kind.__name__}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides (YAML-parsed values)."""
    raw = read_config_file(path) if path is not None else {}
    source = str(path) if path else "config"
    values = parse_overrides(overrides)
    # the overrides alone first: a bad one names the --set, not the file it would land in
    Config.sections(with_values({}, values, "override"), "--set")
    return Config.from_dict(with_values(raw, values, "override"), source)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['meta.inner_steps=2'] -> {'meta.inner_steps': 2} (values parsed as YAML)."""
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key.count(".") != 1:
            raise InputError(f"override {item!r} must look like section.key=value")
        values[key] = yaml.safe_load(text) if text else ""
    return values


def read_config_file(path: str | Path) -> dict:
    """A config YAML file as a raw mapping of sections (checked by `Config.from_dict`)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict | None) for v in raw.values()):
        raise InputError("a config file must be a mapping of sections (mappings)", path=path)
    return raw


def flat_settings(config: dict) -> dict[str, Any]:
    """`{"section.key": value}` of a config dict (`Config.to_dict()`, or a checkpoint's)."""
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()}


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing file or a syntax error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise InputError(
            f"invalid YAML: {getattr(error, 'problem', error)}",
            path=path,
            line=mark.line + 1 if mark else None,
        ) from None


def with_values(raw: dict, values: dict[str, Any], what: str) -> dict:
    """A copy of a raw config mapping with `section.key` values set (checked later by
    `Config.from_dict`, which names any unknown key)."""
    raw = {section: dict(keys or {}) for section, keys in raw.items()}  # `data:` alone is empty
    for key, value in values.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise InputError(f"{what} {key!r} must name a config key as section.key")
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return raw
