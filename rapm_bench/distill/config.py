"""`rapm-bench distill`: one frozen config, one preset per world (docs/design.md §1).

Every field carries its default and why. The defaults are the `tiny` world's, chosen by the ablation in
results/tiny/rapm.md; a world's preset changes the fields its WorldSpec names (the shipped ones: rapm_bench/presets.py;
`sdxl` keeps the objective's defaults and scales the run to the paper's: 1000 trajectories, 20K iterations,
batch 1, rank 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..config import WorldConfig
from ..errors import UserError
from ..lora import LORA_FORMATS, LORA_TARGETS
from ..plugins import ObjectiveSpec, get_objective
from ..worlds.registry import get_world_spec

FLAT_OBJECTIVES = ("rapm", "pcm", "dmd2")  # the objectives whose settings every config.json holds (RAPM (ours),
#   PCM (Wang et al. 2024), DMD2 (Yin et al. 2024): the ones shipped when the file was flat); another objective's
#   appear only when it is chosen or set. The objectives themselves are a registry (rapm_bench.plugins).
OBJECTIVES = FLAT_OBJECTIVES
LOG_WITH = ("tensorboard", "wandb", "mlflow")  # --log-with: accelerate's trackers (distill/tracking.py)
LORA_IMPLS = ("peft", "merged", "fast")  # --lora-impl: PEFT layers, or rapm_bench.fastlora's layers: "merged"
#                                           (W + s·B·A in one kernel, a cached copy), "fast" (the low-rank branch)


_MISSING = object()


def known_objectives() -> tuple[str, ...]:
    """--objective's values, from the registry (rapm_bench.plugins): the shipped ones first."""
    from ..plugins import objective_names

    names = objective_names()
    return tuple(n for n in FLAT_OBJECTIVES if n in names) + tuple(n for n in names if n not in FLAT_OBJECTIVES)


def objective_spec(name: str) -> ObjectiveSpec:
    """The registry entry of objective `name` (UserError naming the known ones)."""
    spec = get_objective(name)
    if spec is None:
        raise UserError(f"unknown objective {name!r}; known: {', '.join(known_objectives())}")
    return spec


def _defaults(name: str, changes: dict[str, Any] | None = None) -> Any:
    """Objective `name`'s config: its defaults with `changes`."""
    return objective_spec(name).config(**(changes or {}))


def _canonical_methods(methods: Any, objective: str) -> tuple[tuple[str, Any], ...]:
    """(name, config) pairs in one order (FLAT_OBJECTIVES', then by name), the defaults of FLAT_OBJECTIVES and
    the chosen objective filled in (an objective not in the registry is left out: `validate` names it)."""
    given = dict(methods.items() if hasattr(methods, "items") else methods)
    for name in (*FLAT_OBJECTIVES, objective):
        if name not in given and get_objective(name) is not None:
            given[name] = _defaults(name)
    order = {n: i for i, n in enumerate(FLAT_OBJECTIVES)}
    return tuple(sorted(given.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _flat_values(methods: Any) -> dict[tuple[str, str], Any]:
    """(objective, field) -> value over the configs."""
    return {(m, f.name): getattr(c, f.name) for m, c in dict(methods).items() for f in fields(c)}


def _flat_names(names: Any) -> dict[str, list[tuple[str, str]]]:
    """flat name (`pcm_huber_c`) -> [(objective, field)] over the objectives `names` (those registered)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for m in names:
        spec = get_objective(m)
        if spec is not None:
            for f in fields(spec.config):
                out.setdefault(spec.flat_prefix + f.name, []).append((m, f.name))
    return out


def _split_flat(flat: dict[str, Any], objective: str, extra: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Flat method names (`pcm_huber_c`, `lambda_abs`) -> {objective: {field: value}}; looks among
    FLAT_OBJECTIVES, the chosen objective and `extra` first, then every registered objective. TypeError on a
    name none has (as an unknown keyword)."""
    first = dict.fromkeys((*FLAT_OBJECTIVES, objective, *extra))
    names = _flat_names(list(first))
    if set(flat) - set(names):
        names = _flat_names(list(first) + [n for n in known_objectives() if n not in first]) | names
    unknown = sorted(set(flat) - set(names))
    if unknown:
        raise TypeError(f"unknown distill config fields: {unknown}")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        method, field_name = names[key][0]
        out.setdefault(method, {})[field_name] = tuple(value) if isinstance(value, list) else value
    return out


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distillation run; written to `out/config.json` before any work."""

    world: WorldConfig = field(default_factory=WorldConfig)  # the teacher (preset, weights, device, precision)
    out: str = "runs/distill/tiny"  # run folder: config, checkpoint, log, samples, lora.safetensors

    # --- 1. teacher trajectories (docs/rapm.md §3) ------------------------------------------------
    num_trajectories: int = 256  # K prompts × seeded noise; tiny: 256 is enough at batch 1 (paper: 1000)
    slots: int = 4  # N coarse slots = the student's sampling steps (`--steps`; N = 4: DDIM trailing 999, 749, 499,
    #                 249; N = 1: 999 only); the LoRA records N and its sampler, and eval samples it at N
    substeps: int = 4  # M teacher DDIM sub-steps per slot (N·M-step teacher); tiny ablation: 4 ≈ 10
    guidance: float | None = 2.0  # teacher CFG scale w; None = the world's default; tiny ablation: 2 beat 3 and 5
    prompts: str | None = None  # caption file (.txt, or COCO captions_*.json); None = shapes train split (tiny)
    prompt_offset: int = 0  # tiny: first train-split index (the evaluator trains from 5M, the eval split is apart)
    trajectory_seed: int = 0  # trajectory k starts from noise seeded with trajectory_seed + k
    trajectory_batch: int = 64  # trajectories per teacher batch (and per cache shard)
    cache_dir: str | None = None  # None = $RAPM_BENCH_CACHE or ~/.cache/rapm-bench, under trajectories/<hash>
    store_dtype: str = "fp32"  # dtype of stored trajectory points (fp16 halves SDXL's 1.2 GB for 1000)

    # --- 2. student (docs/rapm.md §5) --------------------------------------------------------------
    rank: int = 1  # LoRA rank (paper: 1); tiny ablation: 4 is no better
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes: attention, FF, resnets, samplers, time emb
    grad_checkpointing: bool | None = False  # recompute UNet activations in backward (SDXL bs 1: 5.9 vs 13.9 GiB);
    #                                          None = auto: off when the passes fit the GPU's free memory (the
    #                                          run's config.json records the choice, distill/memory.py)
    slot_chunk: int = 4  # slots per student forward: N batches the roll-out (speed), 1 saves memory
    fast_nograd: bool = True  # GPU: RAPM's no-grad passes (roll-out, relative targets, real features) replayed
    #                           from CUDA graphs, the first roll-out jump and the relative targets in one batch;
    #                           the CPU path is eager either way (objectives.fast_nograd)
    fast_grad: bool = True  # GPU, lora_impl "merged", no gradient checkpointing: RAPM's gradient passes (the
    #                         student's jumps, the fake side's features) replayed from CUDA graphs, forward and
    #                         backward (objectives.fast_grad); otherwise, and on the CPU, eager
    compile_blocks: bool = True  # GPU, FastLoRA (lora_impl merged/fast), no gradient checkpointing: each ResNet and
    #                              transformer block of the UNet compiled by inductor, LoRA layers eager (regions.py;
    #                              trajectories and every pass; an H100: the engine 0.527 -> 0.486 s an iteration);
    #                              the first iterations compile (cold: >= 4 min; from inductor's on-disk cache on the
    #                              same machine: ~45 s); the CPU: eager
    lora_impl: str = "peft"  # "peft": diffusers/PEFT layers; "merged": fastlora.FastLoRA, every pass one kernel
    #                          with W + s·B·A and a low-rank backward (RAPM only; SDXL on an H100 at 4 slots per
    #                          pass: ×0.97 of the bare UNet passes vs PEFT's ×1.91, results/bench/README.md);
    #                          "fast": fastlora.FastLoRA through the low-rank branch (no weight copy; RAPM only)

    # --- 3. objective (docs/rapm.md §4); each objective's own settings are its config (`methods`, below) ----
    disc_hidden: int = 64  # discriminator head width (conv3×3 → GroupNorm → SiLU → conv1×1 per feature level;
    #                        RAPM's heads, PCM's and DMD2's optional GAN heads)
    objective: str = "rapm"  # "rapm" (ours), "pcm" (phased consistency), "dmd2" (distribution matching + GAN)

    # --- 4. optimisation --------------------------------------------------------------------------
    iters: int = 200  # iterations, one trajectory each (batch 1); tiny: FID is flat from ~50 (rapm.md)
    lr: float = 1e-3  # student (LoRA) AdamW learning rate; constant after warm-up so --resume can extend
    disc_lr: float = 1e-3  # discriminator heads' AdamW learning rate
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas of both optimisers (β1 = 0, the usual GAN choice)
    weight_decay: float = 0.0  # AdamW decay (LoRA B starts at 0: decay would pull it back)
    warmup: int = 20  # linear LR warm-up iterations
    grad_clip: float = 1.0  # max global grad norm of the LoRA (0 = off)
    seed: int = 0  # LoRA init, head init, and every iteration's randomness via (seed, step)

    # --- 5. run management ------------------------------------------------------------------------
    checkpoint_every: int = 50  # iterations between atomic checkpoints (and LoRA exports)
    log_every: int = 10  # iterations per JSONL log row (interval means)
    sample_every: int = 100  # iterations between sample grids (0 = only at the end)
    sample_count: int = 8  # prompts in each sample grid (student, N DDIM-trailing steps, guidance 1)
    format: str = "diffusers"  # LoRA file keys: "diffusers" (load_lora_weights) or "kohya" (ComfyUI/A1111)
    save_dtype: str = "fp32"  # dtype of the exported LoRA (fp16 halves the file)
    log_with: str | None = None  # also log the JSONL scalars and sample grids to "tensorboard", "wandb" or
    #                              "mlflow" (accelerate's trackers, offline, under out/logs/); not part of what
    #                              identifies a run: a resume may add or change it

    # --- 6. the objectives' own settings (rapm_bench.plugins.ObjectiveSpec.config) -------------------------
    methods: tuple[tuple[str, Any], ...] = ()  # (objective, its config): always FLAT_OBJECTIVES' and the chosen
    #   one's (defaults filled in; a mapping is accepted); read as `cfg.rapm.lambda_abs`, `cfg.pcm.huber_c`,
    #   `cfg.method(cfg.objective)`; config.json stores them flat (`lambda_abs`, `pcm_huber_c`, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", _canonical_methods(self.methods, self.objective))

    def __getattr__(self, name: str) -> Any:
        """`cfg.pcm` (an objective's config) and the flat names of before (`cfg.pcm_huber_c`, `cfg.lambda_abs`)."""
        if name.startswith("__") or name == "methods":
            raise AttributeError(name)
        methods = dict(self.methods)
        if name in methods:
            return methods[name]
        for method, field_name in _flat_names(methods).get(name, ()):
            return getattr(methods[method], field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def method(self, name: str | None = None) -> Any:
        """The config of objective `name` (default: the one trained)."""
        name = name or self.objective
        methods = dict(self.methods)
        if name not in methods:
            raise KeyError(f"no settings of objective {name!r} in this config")
        return methods[name]

    def flat(self) -> dict[str, Any]:
        """The config as one flat mapping, the form config.json has always had: shared fields, then every
        objective's fields as `<prefix><field>` (rapm: `lambda_abs`, pcm: `pcm_huber_c`, dmd2: `dmd2_t_min`)."""
        d = asdict(self)
        del d["methods"]
        for (method, field_name), value in _flat_values(self.methods).items():
            key = objective_spec(method).flat_prefix + field_name
            if key in d:
                raise ValueError(f"objective {method!r} field {field_name!r} is stored as {key!r}, a name taken")
            d[key] = value
        return d

    def diff(self, other: DistillConfig) -> list[str]:
        """The flat names (config.json's) whose values differ."""
        a, b = self.flat(), other.flat()
        return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))

    def to_json(self) -> str:
        """Stable JSON of the resolved config (flat: see `flat`)."""
        return json.dumps(self.flat(), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> DistillConfig:
        """Inverse of `to_json`; fields a config.json written by an older version lacks take their defaults."""
        d = json.loads(text)
        d["world"] = WorldConfig(**d["world"])
        for name in ("lora_targets", "betas"):
            if name in d:
                d[name] = tuple(d[name])
        shared = {f.name for f in fields(DistillConfig)} - {"methods"}
        top = {k: d.pop(k) for k in list(d) if k in shared}
        objective = top.get("objective", "rapm")
        methods = _split_flat(d, objective)  # raises TypeError on a name no objective has
        return DistillConfig(**top, methods={m: _defaults(m, changes) for m, changes in methods.items()})


def distill_preset(name: str) -> DistillConfig:
    """The named world's distill preset: DistillConfig's defaults (tiny's) with the world's own fields
    (`WorldSpec.distill`, flat names as in config.json; `WorldSpec.distill_world`; the shipped ones in rapm_bench/presets.py)."""
    spec = get_world_spec(name)  # one error message for unknown presets
    base = DistillConfig()
    return _apply(replace(base, world=replace(base.world, preset=spec.name, **spec.distill_world)), dict(spec.distill))


def _apply(base: DistillConfig, overrides: dict[str, Any],
           settings: dict[str, dict[str, Any]] | None = None) -> DistillConfig:
    """`base` with flat overrides (shared fields, and objective fields by their flat names) and per-objective
    `settings` ({objective: {field: value}}, from --set) applied; no validation."""
    shared = {f.name for f in fields(DistillConfig)} - {"methods"}
    top = {k: overrides.pop(k) for k in list(overrides) if k in shared}
    objective = top.get("objective", base.objective)
    changes = _split_flat(overrides, objective, tuple(settings or ()))
    for method, values in (settings or {}).items():
        for key, value in values.items():
            flag = changes.setdefault(method, {})
            if key in flag and flag[key] != value:
                raise UserError(f"--set {method}.{key}={value!r} disagrees with its flag's {flag[key]!r} (give one)")
            flag[key] = value
    for name in ("lora_targets", "betas"):
        if name in top:
            top[name] = tuple(top[name])
    methods = dict(base.methods)
    for method, values in changes.items():
        methods[method] = replace(methods[method], **values) if method in methods else _defaults(method, values)
    return replace(base, methods=methods, **top)


def override(cfg: DistillConfig, **changes: Any) -> DistillConfig:
    """`dataclasses.replace` that also takes an objective's fields by their config.json names (`lambda_rel`,
    `pcm_huber_c`); no validation (as replace)."""
    return _apply(cfg, dict(changes))


def parse_settings(items: Any) -> dict[str, dict[str, Any]]:
    """`--set` items (`pcm.huber_c=0.002`, `rapm.distance=l2`, `dmd2.fake_lr=none`) -> {objective: {field:
    value}}, each value parsed as its field's type; UserError (one line) for a bad item, objective, field or
    value."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        key, eq, text = str(item).partition("=")
        method, dot, name = key.strip().partition(".")
        if not eq or not dot or not method or not name:
            raise UserError(f"--set {item!r}: expected OBJECTIVE.FIELD=VALUE (e.g. pcm.huber_c=0.002)")
        spec = get_objective(method)
        if spec is None:
            raise UserError(f"--set {item!r}: unknown objective {method!r}; known: {', '.join(known_objectives())}")
        hints = {f.name: f.type for f in fields(spec.config)}
        if name not in hints:
            raise UserError(f"--set {item!r}: objective {method} has no field {name!r}; its fields: "
                            f"{', '.join(hints) or 'none'}")
        out.setdefault(method, {})[name] = _parse_value(item, text.strip(), _field_type(spec.config, name))
    return out


def _field_type(cls: type, name: str) -> Any:
    """The resolved annotation of a dataclass field (string annotations included)."""
    import typing

    return typing.get_type_hints(cls)[name]


def _parse_value(item: str, text: str, tp: Any) -> Any:
    """`text` as a value of type `tp` (bool, int, float, str, tuples of them, optional: `none`)."""
    import types
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _parse_value(item, text, a)
            except UserError:
                continue
        raise UserError(f"--set {item!r}: {text!r} is not a {' or '.join(_type_name(a) for a in options)}")
    if typing.get_origin(tp) is tuple:
        inner = args[0] if args else str
        return tuple(_parse_value(item, t.strip(), inner) for t in text.split(",") if t.strip())
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if tp in (int, float, str):
            return tp(text)
    except ValueError:
        raise UserError(f"--set {item!r}: {text!r} is not a {_type_name(tp)}") from None
    raise UserError(f"--set {item!r}: fields of type {tp} cannot be set from the command line")


def _type_name(tp: Any) -> str:
    return {bool: "boolean (true/false)", int: "whole number", float: "number", str: "string"}.get(tp, str(tp))


def resolve_distill(preset: str = "tiny", settings: Any = (), **overrides: Any) -> DistillConfig:
    """The preset's config with the given overrides (None = keep the preset's), validated.

    World fields (`teacher`, `device`, `precision`, `resolution`, `vae`) may be given flat, and so may an
    objective's fields by their config.json names (`pcm_huber_c`, `lambda_abs`); `settings` are `--set` items
    (`pcm.huber_c=0.002`) or a mapping {objective: {field: value}}. Without `out`, another objective than the
    preset's runs in `<preset out>-<objective>`.
    """
    base = distill_preset(preset)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    by_method = {m: dict(v) for m, v in settings.items()} if hasattr(settings, "items") else parse_settings(settings)
    if "out" not in overrides and overrides.get("objective", base.objective) != base.objective:
        overrides["out"] = f"{base.out}-{overrides['objective']}"  # runs/distill/tiny-pcm: runs of objectives apart
    world_keys = {f.name for f in fields(WorldConfig)} - {"preset"}
    world = replace(base.world, **{k: overrides.pop(k) for k in list(overrides) if k in world_keys})
    spec = get_objective(overrides.get("objective", base.objective))
    if spec is not None and "lora_impl" not in overrides and base.lora_impl not in spec.lora_impls:
        overrides["lora_impl"] = spec.lora_impls[0]  # PCM's EMA target and DMD2's second adapter work on PEFT layers
    cfg = _apply(replace(base, world=world), overrides, by_method)
    validate(cfg)
    return cfg


def validate(cfg: DistillConfig) -> None:
    """Reject values the engine cannot run, with the option's name."""
    if cfg.slots < 1:
        raise UserError(f"--steps must be at least 1 (the student's sampling steps = coarse slots), got {cfg.slots}")
    positive = {"num_trajectories": cfg.num_trajectories, "substeps": cfg.substeps,
                "trajectory_batch": cfg.trajectory_batch, "rank": cfg.rank, "slot_chunk": cfg.slot_chunk,
                "checkpoint_every": cfg.checkpoint_every, "log_every": cfg.log_every,
                "disc_hidden": cfg.disc_hidden}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.iters < 0:
        raise UserError(f"--iters must be at least 0, got {cfg.iters}")
    if cfg.lr <= 0 or cfg.disc_lr <= 0:
        raise UserError(f"learning rates must be positive, got --lr {cfg.lr}, --disc-lr {cfg.disc_lr}")
    known = known_objectives()
    if cfg.objective not in known:
        raise UserError(f"--objective must be one of {', '.join(known)}, got {cfg.objective!r}")
    for name, method in cfg.methods:  # each objective checks its own settings (rapm_config, baselines/pcm.py, ...)
        method.validate(cfg, name == cfg.objective)
    if cfg.lora_impl not in LORA_IMPLS:
        raise UserError(f"--lora-impl must be one of {', '.join(LORA_IMPLS)}, got {cfg.lora_impl!r}")
    if cfg.lora_impl not in (impls := objective_spec(cfg.objective).lora_impls):
        able = [n for n in known if cfg.lora_impl in objective_spec(n).lora_impls]
        raise UserError(f"--lora-impl {cfg.lora_impl} trains the {', '.join(able)} objective only; --objective "
                        f"{cfg.objective} needs --lora-impl {impls[0]} (its EMA target or second adapter works on "
                        "PEFT layers)")
    if cfg.log_with is not None and cfg.log_with not in LOG_WITH:
        raise UserError(f"--log-with must be one of {', '.join(LOG_WITH)}, got {cfg.log_with!r}")
    if cfg.format not in LORA_FORMATS:
        raise UserError(f"--format must be one of {', '.join(LORA_FORMATS)}, got {cfg.format!r}")
    for name in ("store_dtype", "save_dtype"):
        if getattr(cfg, name) not in ("fp32", "fp16", "bf16"):
            raise UserError(f"{name} must be fp32, fp16 or bf16, got {getattr(cfg, name)!r}")
    if cfg.guidance is not None and not 0.0 <= cfg.guidance <= 50.0:
        raise UserError(f"--cfg must be between 0 and 50, got {cfg.guidance}")
    if cfg.substeps > 1000 // cfg.slots:
        raise UserError(f"--steps {cfg.slots} leaves {1000 // cfg.slots} timesteps per slot, fewer than --M "
                        f"{cfg.substeps} teacher sub-steps: lower --steps or --M")
    world = get_world_spec(cfg.world.preset)
    if world.training_prompts is None and cfg.prompts is None:
        raise UserError(f"--preset {world.name} needs --prompts FILE: {world.prompts_help}")
