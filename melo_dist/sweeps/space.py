"""A sweep definition: a YAML file naming the base config, what every trial fixes, what it
searches, and each trial's resources. Parsed and checked here, before any Ray work starts.

    base: configs/synthetic.yaml            # the config every trial starts from
    fixed: {optim.iterations: 60}            # section.key values set in every trial
    search:                                  # section.key -> one distribution
      meta.inner_lr: {loguniform: [1.0e-4, 1.0e-1]}
      meta.inner_steps: {randint: [1, 5]}    # both ends included
      model.backbone: {choice: [gru4rec, sasrec]}
    initial: [{meta.inner_lr: 1.0e-3, ...}]  # trials run first (e.g. the reference defaults)
    seed: 0                                  # seeds Optuna's TPE sampler
    scheduler: {grace_iterations: 20, reduction_factor: 2}   # ASHA on validation RMSE
    trial: {workers: 2, cpus_per_worker: 0.5, driver_cpus: 0.25, concurrent: 0}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from melo_dist.config import (
    Config,
    build_section,
    coerce,
    parse_overrides,
    read_config_file,
    read_yaml,
    with_values,
)
from melo_dist.errors import InputError

KINDS = ("choice", "uniform", "loguniform", "randint")
NOT_SEARCHABLE = ("data.path", "run.out")  # where things are, not how they train


@dataclass
class Distribution:
    kind: str  # one of KINDS
    values: list  # the choices, or [low, high]


@dataclass
class SchedulerSettings:
    grace_iterations: int = 0  # ASHA's grace period; 0 = two validations
    reduction_factor: int = 2


@dataclass
class TrialSettings:
    workers: int = 2  # Ray Train workers per trial
    cpus_per_worker: float = 0.5  # fractional: a 2-core machine still fits a trial
    driver_cpus: float = 0.25  # the trial function itself (Tune cannot schedule 0)
    use_gpu: bool = False
    concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs fit
    max_failures: int = 0  # worker failures a trial recovers from (from its last checkpoint)
    wait_for_nodes: bool = False  # a trial bigger than the cluster waits for an autoscaler


@dataclass
class SweepSpace:
    path: str
    base: dict  # the raw base config with `fixed` applied
    search: dict[str, Distribution]
    initial: list[dict] = field(default_factory=list)
    seed: int = 0
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    trial: TrialSettings = field(default_factory=TrialSettings)

    def trial_config(self, params: dict[str, Any], out: str | Path) -> Config:
        """The full config of one trial: base, fixed values, then its sampled parameters."""
        raw = with_values(self.base, {**params, "run.out": str(out)}, "parameter")
        return Config.from_dict(raw, source=f"{self.path} (trial parameters {params})")

    @property
    def base_config(self) -> Config:
        """The config every trial starts from, before its sampled parameters."""
        return Config.from_dict(self.base)

    @property
    def grace_iterations(self) -> int:
        config = self.base_config
        default = min(2 * config.run.validate_every, config.optim.iterations)
        return self.scheduler.grace_iterations or default

    def resolved(self) -> SweepSpace:
        """A copy whose data and init paths are absolute: trials run in their own folders,
        maybe on other nodes, never in the caller's working directory."""
        values, config = {}, self.base_config
        for key in ("data.path", "run.init_from"):
            value = config.get(key)
            if value and not Path(value).is_absolute() and "://" not in value:
                values[key] = str(Path(value).resolve())
        return dataclasses.replace(self, base=with_values(self.base, values, "path"))

    @property
    def max_iterations(self) -> int:
        """The longest a trial can train (ASHA's max_t), also when iterations are searched."""
        dist = self.search.get("optim.iterations")
        if dist is None:
            return self.base_config.optim.iterations
        return int(max(dist.values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_space(path: str | Path, overrides: list[str] = ()) -> SweepSpace:
    """Parse and check a sweep space. `overrides` (`section.key=value`) set the space's own
    `trial.*` and `scheduler.*` settings, or fix a config value in every trial (a searched key
    given this way is no longer searched)."""
    raw = read_yaml(path)
    where = str(path)
    if not isinstance(raw, dict):
        raise InputError("a sweep space must be a mapping", path=path)
    known = {"base", "fixed", "search", "initial", "seed", "scheduler", "trial"}
    unknown = set(raw) - known
    if unknown:
        raise InputError(f"unknown key(s) {sorted(unknown)}; known: {sorted(known)}", path=path)
    fixed, search = dict(mapping(raw, "fixed", where)), dict(mapping(raw, "search", where))
    for key, value in parse_overrides(overrides).items():
        section, name = key.split(".")
        if section in ("trial", "scheduler"):
            raw[section] = {**mapping(raw, section, where), name: value}
        else:
            fixed[key] = value
            search.pop(key, None)
    both = sorted(set(search) & set(fixed))
    if both:
        raise InputError(f"{both} are both fixed and searched", path=path)

    trial = settings(TrialSettings, raw, "trial", where)
    scheduler = settings(SchedulerSettings, raw, "scheduler", where)
    base = read_config_file(raw["base"]) if raw.get("base") else {}
    base = with_values(base, fixed, "fixed key")
    check(base, where, "base and fixed values", trial.workers)

    search = {key: distribution(key, spec, where) for key, spec in search.items()}
    if not search:
        raise InputError("search names no parameter to search", path=path)
    for key, dist in search.items():  # every value a trial can draw, or a range's both ends
        every = range(dist.values[0], dist.values[1] + 1) if dist.kind == "randint" else None
        for value in every if every is not None and len(every) <= 1000 else dist.values:
            raw_config = with_values(base, {key: value}, "search key")
            check(raw_config, where, f"search {key}={value!r}", trial.workers)

    initial = raw.get("initial") or []
    if not isinstance(initial, list) or not all(isinstance(p, dict) for p in initial):
        raise InputError("initial must be a list of {section.key: value} mappings", path=path)
    initial = [{k: v for k, v in point.items() if k in search} for point in initial]  # minus --set
    for point in initial:
        if set(point) != set(search):
            raise InputError(
                f"initial point {point} must set exactly the searched keys {sorted(search)}",
                path=path,
            )
        for key, value in point.items():
            point[key] = drawn(search[key], key, value, where)
        check(
            with_values(base, point, "initial key"), where, f"initial point {point}", trial.workers
        )

    space = SweepSpace(
        where,
        base,
        search,
        initial,
        coerce(raw.get("seed", 0), int, f"{where}: seed"),
        scheduler,
        trial,
    )
    if scheduler.grace_iterations > space.max_iterations:
        raise InputError(
            f"scheduler.grace_iterations ({scheduler.grace_iterations}) exceeds the longest "
            f"trial ({space.max_iterations} iterations)",
            path=path,
        )
    return space


def key_type(key: str, where: str) -> type:
    """The declared type of a `section.key` config value."""
    section, _, name = key.partition(".")
    hints = get_type_hints(Config)
    if section not in hints or name not in get_type_hints(hints[section]):
        raise InputError(f"{key} is not a config key (section.key)", path=where)
    return get_type_hints(hints[section])[name]


def check(raw: dict, where: str, what: str, workers: int) -> None:
    """A config mapping must make a valid Config whose meta-batch splits evenly over a trial's
    workers; the error says which part of the space."""
    try:
        Config.from_dict(raw).check_workers(workers, "trial.workers")
    except InputError as error:
        raise InputError(f"{what}: {error}", path=where) from None


def drawn(dist: Distribution, key: str, value: Any, where: str) -> Any:
    """An initial point's value, typed as its config key and inside its distribution."""
    value = coerce(value, key_type(key, where), f"{where}: initial {key}")
    inside = (
        value in dist.values if dist.kind == "choice" else dist.values[0] <= value <= dist.values[1]
    )
    if not inside:
        raise InputError(
            f"initial {key}={value!r} is outside its {dist.kind} {dist.values}", path=where
        )
    return value


def mapping(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise InputError(f"{key} must be a mapping of section.key entries", path=where)
    return value


def distribution(key: str, spec: Any, where: str) -> Distribution:
    if key in NOT_SEARCHABLE:
        raise InputError(f"search key {key} cannot be searched (set it under fixed)", path=where)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise InputError(
            f"search key {key} must be one of {{kind: values}} with kind in {KINDS}, got {spec!r}",
            path=where,
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise InputError(f"search key {key}: {kind} needs a non-empty list", path=where)
    if kind == "choice":
        return Distribution(
            kind, [coerce(v, key_type(key, where), f"{where}: search {key}") for v in values]
        )
    number = int if kind == "randint" else float
    if len(values) != 2:
        raise InputError(f"search key {key}: {kind} needs [low, high], got {values!r}", path=where)
    low, high = (coerce(v, number, f"{where}: search key {key}") for v in values)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise InputError(
            f"search key {key}: {kind} needs low < high"
            + (" and low > 0" if kind == "loguniform" else "")
            + f", got {values!r}",
            path=where,
        )
    if not all(math.isfinite(v) for v in (low, high)):
        raise InputError(f"search key {key}: bounds must be finite, got {values!r}", path=where)
    return Distribution(kind, [low, high])


SETTING_RANGES = {
    "workers": lambda v: v >= 1,
    "cpus_per_worker": lambda v: v > 0,
    "driver_cpus": lambda v: v > 0,
    "concurrent": lambda v: v >= 0,
    "max_failures": lambda v: v >= 0,
    "grace_iterations": lambda v: v >= 0,
    "reduction_factor": lambda v: v >= 2,
}


def settings(kind: type, raw: dict, key: str, where: str) -> Any:
    section = build_section(kind, mapping(raw, key, where), f"{where}: {key}")
    for name, value in dataclasses.asdict(section).items():
        in_range = SETTING_RANGES.get(name)
        if in_range and not in_range(value):
            raise InputError(f"{key}.{name} is out of range: {value!r}", path=where)
    return section
