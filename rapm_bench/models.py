"""Model specs: what a model name means (weights, sampler, steps, guidance) in each world.

The specs themselves live in the top-level `baselines/` registry, one module per model; the package finds
them as plug-ins (entry points, rapm_bench.plugins), never by importing `baselines`; `register_model` adds one at
run time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from .errors import UserError
from .plugins import MODELS_GROUP, plugin_entry_points
from .sampling import SamplerRecipe


@dataclass(frozen=True)
class HubFile:
    """A published weights file on the Hugging Face hub."""

    repo: str
    filename: str
    revision: str | None = None  # pin a commit: several published files were replaced after release
    subfolder: str | None = None
    sha256: str | None = None

    def fetch(self) -> Path:
        """Local path of the file: the hub cache, or a download where the network allows."""
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(self.repo, self.filename, subfolder=self.subfolder, revision=self.revision))
        except Exception as e:  # noqa: BLE001 - offline, missing, or refused: all need the same advice
            raise UserError(
                f"cannot get {self.repo}/{self.filename} ({type(e).__name__}): download it with "
                f"`huggingface-cli download {self.repo} {self.filename}` or pass --lora PATH"
            ) from None
        self.verify(path)
        return path

    def verify(self, path: Path) -> None:
        """Check a fetched file against the pinned sha256 (when one is pinned)."""
        if self.sha256 is None:
            return
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != self.sha256.lower():
            raise UserError(
                f"{self.repo}/{self.filename} at {path} hashes to {h.hexdigest()[:12]}…, not the pinned "
                f"{self.sha256[:12]}…: the file is corrupt or was replaced upstream; delete it and download it "
                f"again (`huggingface-cli download {self.repo} {self.filename}`), or pass --lora PATH"
            )


@dataclass(frozen=True)
class Reported:
    """A score its authors reported: shown beside ours, never mixed with measurements."""

    preset: str  # the world it refers to ("sdxl")
    steps: int | None  # None = not stated
    fid: float | None
    clip_score: float | None
    protocol: str  # their protocol, in words, with what differs from ours
    source: str  # where the number is printed


LoraSource = HubFile | str | dict[int, HubFile | str]
"""A hub file, a path inside the package (or absolute), or one of those per step count."""


@dataclass(frozen=True)
class ModelSpec:
    """One evaluable model: teacher, or teacher + LoRA, with its sampler recipe."""

    name: str
    description: str
    recipe: SamplerRecipe
    default_steps: int
    steps: tuple[int, ...] | None = None  # step counts it ships; None = any
    guidance: float | None = None  # None = the world's teacher guidance
    lora: dict[str, LoraSource] | None = None  # per preset: hub file, or a path inside the package
    reported: tuple[Reported, ...] = ()  # the authors' numbers
    trained: str | None = None  # a LoRA trained here whose metadata set steps and sampler (see `with_lora`)
    train_command: str | None = None  # the command that trains its weights shipped in the package (tiny)

    def resolve(self, steps: int | None, guidance: float | None) -> tuple[int, float | None]:
        """Validated (steps, guidance), the model's defaults filling what is None (guidance may stay None)."""
        steps = self.default_steps if steps is None else steps
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        self.check_steps(steps)
        if guidance is not None and not 0.0 <= guidance <= 50.0:
            raise UserError(f"--guidance must be between 0 and 50, got {guidance}")
        return steps, self.guidance if guidance is None else guidance

    def check_steps(self, steps: int) -> None:
        """Reject a step count this model does not ship."""
        if self.trained is not None and self.steps is not None and steps not in self.steps:
            raise UserError(f"LoRA {self.trained} was trained for {self.steps[0]}-step sampling (its metadata), got "
                            f"--steps {steps}: sample it with --steps {self.steps[0]}, or distil one with "
                            f"`rapm-bench distill --steps {steps}`")
        if self.steps is not None and steps not in self.steps:
            shipped = ", ".join(map(str, self.steps))
            raise UserError(f"model {self.name!r} ships {shipped}-step weights only, got --steps {steps}")

    def lora_path(self, preset: str, steps: int) -> Path | None:
        """The LoRA weights for this preset and step count (None for the plain teacher)."""
        if self.lora is None:
            return None
        source = self.lora.get(preset)
        if isinstance(source, dict):
            source = source.get(steps)
        if source is None:
            raise UserError(f"model {self.name!r} has no {steps}-step weights for preset {preset!r}; "
                            "pass --lora PATH")
        if isinstance(source, HubFile):
            return source.fetch()
        path = Path(__file__).parent / source  # absolute paths (lora:PATH) stay as they are
        if Path(source).is_absolute() and not path.exists():
            raise UserError(f"LoRA file not found: {path}")
        if not path.exists():
            how = (f"train it with {self.train_command} and pass that file as --lora" if self.train_command
                   else "pass --lora PATH")
            raise UserError(f"model {self.name!r} for preset {preset!r} is not trained yet ({path} missing); "
                            f"{how}, or run `rapm-bench reproduce` (it trains and evaluates every model)")
        return path

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record for manifests and results."""
        return {"name": self.name, "recipe": self.recipe.describe()}


TRAINED_KEY = "rapm_bench"
"""safetensors metadata key of a LoRA `rapm-bench distill` wrote: a JSON record of what it was trained for."""


def trained_record(steps: int, objective: str, recipe: SamplerRecipe, guidance: float, preset: str) -> dict[str, str]:
    """The metadata a distilled LoRA carries: its sampling steps, sampler and guidance (what it was trained for)."""
    return {TRAINED_KEY: json.dumps({"steps": steps, "objective": objective, "sampler": recipe.describe(),
                                     "guidance": guidance, "preset": preset}, sort_keys=True)}


def read_trained_record(path: Path) -> dict[str, Any] | None:
    """The record of `trained_record` in a LoRA file (or folder), or None (a LoRA from elsewhere)."""
    from .lora import resolve_lora_path

    path = resolve_lora_path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable file fails later, with the loader's own message
        return None
    return json.loads(meta[TRAINED_KEY]) if TRAINED_KEY in meta else None


def with_lora(spec: ModelSpec, lora: Path | None) -> ModelSpec:
    """The spec with a LoRA file's own record applied: a LoRA trained here samples at its step count with its
    sampler and guidance (N = 1, 2, 4, 8 ...); any other LoRA keeps the spec's."""
    record = None if lora is None else read_trained_record(Path(lora))
    if record is None:
        return spec
    s = record["sampler"]
    recipe = SamplerRecipe(s["scheduler"], s["timestep_spacing"],
                           None if s["timesteps"] is None else tuple(s["timesteps"]), s["eta"],
                           tuple(s["options"].items()))
    steps = int(record["steps"])
    return replace(spec, recipe=recipe, default_steps=steps, steps=(steps,), guidance=float(record["guidance"]),
                   trained=str(lora))


_models: dict[str, ModelSpec] = {}  # registered at run time


def load_models(eps: Iterable[EntryPoint]) -> dict[str, ModelSpec]:
    """The model specs the entry points name (each a ModelSpec or a {name: ModelSpec} mapping), by name."""
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


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model at run time (it replaces a model of the same name); returns it."""
    _models[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a model registered at run time (tests)."""
    _models.pop(name, None)


def registry() -> dict[str, ModelSpec]:
    """All known models by name: the plug-ins' (`baselines/`), then those registered at run time (which win)."""
    return installed_models() | _models


def lora_model(path: str) -> ModelSpec:
    """`lora:PATH`: any few-step LoRA, sampled with the RAPM recipe (DDIM trailing, guidance 1, 4 steps), or with
    the steps, sampler and guidance its metadata records when `rapm-bench distill` trained it."""
    from .sampling import DDIM_TRAILING
    from .worlds.registry import world_names

    p = Path(path)
    spec = ModelSpec(name=f"lora-{p.stem}", description=f"LoRA file {path}", recipe=DDIM_TRAILING,
                     default_steps=4, guidance=1.0, lora=dict.fromkeys(world_names(), str(p.resolve())))
    return with_lora(spec, p) if p.exists() else spec  # a missing file fails where its weights are needed


def get_model(name: str, lora: str | Path | None = None) -> ModelSpec:
    """A model spec by name (or `lora:PATH`), or a one-line error listing the known names; `lora` (an `--lora`
    override) applies that file's own record (`with_lora`)."""
    if name.startswith("lora:"):
        spec = lora_model(name.removeprefix("lora:"))
    else:
        models = registry()
        if name not in models:
            raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
        spec = models[name]
    return spec if lora is None else with_lora(spec, Path(lora))
