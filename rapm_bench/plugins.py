"""Plug-ins: the published models and the training objectives the package finds without importing them.

Imports run one way, `baselines/` → `rapm_bench`: the package never names `baselines` in an import.
A package declares what it adds as entry points (pyproject.toml):

    [project.entry-points."rapm_bench.models"]      # a ModelSpec, or a {name: ModelSpec} mapping
    baselines = "baselines:MODELS"
    [project.entry-points."rapm_bench.objectives"]  # an ObjectiveBuilder (rapm_bench.distill.objectives)
    pcm = "baselines.pcm:objective"

and a test or a user's script adds one at run time with `register_model` / `register_objective`
(RAPM's own objective registers itself in rapm_bench.distill.objectives). An install made before the
entry points were declared (an editable install sees new ones only once reinstalled) finds none: then
the package's own declarations, `DECLARED`, are loaded the same way (tests/test_imports.py checks they
equal pyproject.toml's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import ModelSpec

MODELS_GROUP = "rapm_bench.models"
OBJECTIVES_GROUP = "rapm_bench.objectives"

DECLARED: dict[str, dict[str, str]] = {
    MODELS_GROUP: {"baselines": "baselines:MODELS"},
    OBJECTIVES_GROUP: {"pcm": "baselines.pcm:objective", "dmd2": "baselines.dmd2:objective"},
}
"""pyproject.toml's entry points, by group: the fallback when none of a group is installed."""

ObjectiveBuilder = Callable[..., Any]
"""(cfg, world, sched, guidance, student, probe) -> Objective: see rapm_bench.distill.objectives."""

_models: dict[str, ModelSpec] = {}  # registered at run time
_objectives: dict[str, ObjectiveBuilder] = {}


@functools.cache
def plugin_entry_points(group: str) -> tuple[EntryPoint, ...]:
    """The installed entry points of `group`; when rapm-bench's own are not installed among them, plus the
    package's declared ones (`DECLARED`) that no installed entry point of the same name replaces (read once)."""
    installed = tuple(entry_points(group=group))
    if any(_ours(ep) for ep in installed):
        return installed
    names = {ep.name for ep in installed}
    return installed + tuple(EntryPoint(name, value, group) for name, value in DECLARED[group].items()
                             if name not in names)


def _ours(ep: EntryPoint) -> bool:
    """Whether the rapm-bench distribution itself declares `ep`."""
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name.lower().replace("_", "-") == "rapm-bench"


def load_models(eps: Iterable[EntryPoint]) -> dict[str, ModelSpec]:
    """The model specs the entry points name (each a ModelSpec or a {name: ModelSpec} mapping), by name."""
    from .models import ModelSpec

    found: dict[str, ModelSpec] = {}
    for ep in eps:
        obj = ep.load()
        specs = [obj] if isinstance(obj, ModelSpec) else list(obj.values()) if isinstance(obj, Mapping) else None
        if specs is None or not all(isinstance(s, ModelSpec) for s in specs):
            raise TypeError(f"entry point {ep.name} = {ep.value} ({ep.group}) is neither a ModelSpec nor a "
                            "mapping of them")
        for spec in specs:
            if spec.name in found:
                raise ValueError(f"model {spec.name!r} is declared twice (again by {ep.value})")
            found[spec.name] = spec
    return found


@functools.cache
def installed_models() -> dict[str, ModelSpec]:
    """The models of the installed plug-ins (loaded once)."""
    return load_models(plugin_entry_points(MODELS_GROUP))


def models() -> dict[str, ModelSpec]:
    """Every known model by name: the plug-ins', then those registered at run time (which win)."""
    return installed_models() | _models


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model at run time (it replaces a model of the same name); returns it."""
    _models[spec.name] = spec
    return spec


@functools.cache
def _load_objective(ep: EntryPoint) -> ObjectiveBuilder:
    builder = ep.load()
    if not callable(builder):
        raise TypeError(f"entry point {ep.name} = {ep.value} ({ep.group}) is not callable")
    return builder


def objective_names() -> tuple[str, ...]:
    """The names of every known objective (nothing is imported to list them)."""
    names = dict.fromkeys(_objectives)
    names.update(dict.fromkeys(ep.name for ep in plugin_entry_points(OBJECTIVES_GROUP)))
    return tuple(names)


def get_objective(name: str) -> ObjectiveBuilder | None:
    """The builder of objective `name` (registered at run time first, then the plug-ins'), or None."""
    if name in _objectives:
        return _objectives[name]
    for ep in plugin_entry_points(OBJECTIVES_GROUP):
        if ep.name == name:
            return _load_objective(ep)
    return None


def register_objective(name: str, build: ObjectiveBuilder) -> ObjectiveBuilder:
    """Add an objective at run time (it replaces one of the same name); returns `build`."""
    _objectives[name] = build
    return build
