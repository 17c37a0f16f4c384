"""Plug-ins: the published models, the training objectives and any extra metrics the package finds without
importing them.

Imports run one way, `baselines/` → `rapm_bench`: the package never names `baselines` in an import.
A package declares what it adds as entry points (pyproject.toml):

    [project.entry-points."rapm_bench.models"]      # a ModelSpec, or a {name: ModelSpec} mapping
    baselines = "baselines:MODELS"
    [project.entry-points."rapm_bench.objectives"]  # an ObjectiveSpec (or a bare ObjectiveBuilder)
    pcm = "baselines.pcm:objective"
    [project.entry-points."rapm_bench.metrics"]     # a MetricSpec (or a list of them): rapm_bench.eval.metrics
    NAME = "PACKAGE.MODULE:SPEC"
    [project.entry-points."rapm_bench.worlds"]      # a WorldSpec: rapm_bench.worlds.registry
    tiny = "rapm_bench.presets:TINY"

and a test or a user's script adds one at run time with `rapm_bench.models.register_model` or
`register_objective` (a metric: rapm_bench.eval.metrics.register_metric; a world:
rapm_bench.worlds.registry.register_world). The package declares its own the same way: the baselines, RAPM's
objective (rapm_bench.distill.rapm_config) and the shipped worlds (rapm_bench.presets); the shipped metrics register
in rapm_bench.eval.metrics. An install made before an entry point was declared (an editable install sees new ones
only once reinstalled) lacks it: the package's own declarations, `DECLARED`, fill in every name no installed entry
point holds (tests/test_imports.py checks they equal pyproject.toml's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

MODELS_GROUP = "rapm_bench.models"
OBJECTIVES_GROUP = "rapm_bench.objectives"
WORLDS_GROUP = "rapm_bench.worlds"
METRICS_GROUP = "rapm_bench.metrics"  # the package declares none: its own metrics register in eval/metrics.py

DECLARED: dict[str, dict[str, str]] = {
    MODELS_GROUP: {"baselines": "baselines:MODELS"},
    OBJECTIVES_GROUP: {"rapm": "rapm_bench.distill.rapm_config:OBJECTIVE", "pcm": "baselines.pcm:objective",
                       "dmd2": "baselines.dmd2:objective"},
    WORLDS_GROUP: {"tiny": "rapm_bench.presets:TINY", "sdxl": "rapm_bench.presets:SDXL"},
}
"""pyproject.toml's entry points, by group: the fallback when none of a group is installed (a group the package
declares nothing in, such as METRICS_GROUP, has no entry)."""

ObjectiveBuilder = Callable[..., Any]
"""(cfg, world, sched, guidance, student, probe) -> Objective: see rapm_bench.distill.objectives."""



@dataclass(frozen=True)
class NoConfig:
    """The config of an objective without settings of its own (a bare builder registered the old way)."""

    def validate(self, cfg: Any, active: bool) -> None:
        """Nothing to check."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """One training objective: its name, its own settings and how to build it for a run.

    `config` is a frozen dataclass of the method's settings with a `validate(cfg, active)` method (cfg: the
    whole DistillConfig; active: whether this objective is the one trained) that raises UserError naming the
    option. `DistillConfig` nests one instance per objective (`cfg.pcm.huber_c`); the command line reaches its
    fields as `--set pcm.huber_c=0.002`, the run's config.json stores them flat as `<prefix><field>`
    (`pcm_huber_c`; RAPM's prefix is "": `lambda_abs`), as before objectives were a registry.
    Calling the spec builds the Objective (the engine's calling convention, `ObjectiveBuilder`)."""

    name: str
    build: ObjectiveBuilder  # (cfg, world, sched, guidance, student, probe) -> Objective
    config: type = NoConfig  # the method's settings (a frozen dataclass with `validate`)
    prefix: str | None = None  # flat config.json / keyword prefix of its fields; None = f"{name}_"
    interior: bool = False  # needs the teacher points inside every slot in the trajectory cache (PCM)
    lora_impls: tuple[str, ...] = ("peft",)  # --lora-impl values it trains with (the first is its default)
    description: str = ""

    @property
    def flat_prefix(self) -> str:
        return f"{self.name}_" if self.prefix is None else self.prefix

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.build(*args, **kwargs)


def as_spec(name: str, obj: Any) -> ObjectiveSpec:
    """An ObjectiveSpec as given, or a bare builder wrapped in one (no settings of its own)."""
    if isinstance(obj, ObjectiveSpec):
        return obj
    if not callable(obj):
        raise TypeError(f"objective {name!r} is neither an ObjectiveSpec nor callable")
    return ObjectiveSpec(name, obj)


_objectives: dict[str, ObjectiveSpec] = {}


@functools.cache
def plugin_entry_points(group: str) -> tuple[EntryPoint, ...]:
    """The installed entry points of `group`, then the package's declared ones (`DECLARED`) that no installed entry
    point of the same name replaces: an install made before one was declared still finds it (read once)."""
    installed = tuple(entry_points(group=group))
    names = {ep.name for ep in installed}
    return installed + tuple(EntryPoint(name, value, group) for name, value in DECLARED.get(group, {}).items()
                             if name not in names)


@functools.cache
def _load_objective(ep: EntryPoint) -> ObjectiveSpec:
    obj = ep.load()
    if not callable(obj):
        raise TypeError(f"entry point {ep.name} = {ep.value} ({ep.group}) is not callable")
    return as_spec(ep.name, obj)


def objective_names() -> tuple[str, ...]:
    """The names of every known objective (nothing is imported to list them)."""
    names = dict.fromkeys(_objectives)
    names.update(dict.fromkeys(ep.name for ep in plugin_entry_points(OBJECTIVES_GROUP)))
    return tuple(names)


def get_objective(name: str) -> ObjectiveSpec | None:
    """The spec of objective `name` (registered at run time first, then the plug-ins'), or None; calling it
    builds the objective."""
    if name in _objectives:
        return _objectives[name]
    for ep in plugin_entry_points(OBJECTIVES_GROUP):
        if ep.name == name:
            return _load_objective(ep)
    return None


def register_objective(name: str, build: ObjectiveBuilder | ObjectiveSpec) -> ObjectiveBuilder | ObjectiveSpec:
    """Add an objective at run time (it replaces one of the same name): an ObjectiveSpec, or a bare builder
    (an objective without settings of its own); returns what it was given."""
    _objectives[name] = as_spec(name, build)
    return build


def unregister_objective(name: str) -> None:
    """Remove an objective registered at run time (tests)."""
    _objectives.pop(name, None)
