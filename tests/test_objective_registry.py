"""Objectives as a registry, each with its own config (issue 15, item 3): a plug-in's objective with its own
settings is reachable by `--set toy.x=...` and resolve_distill and validates itself; the old flags equal the
`--set` spelling; config.json keeps its flat form (byte for byte) and round-trips."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.distill.config import DistillConfig, distill_preset, parse_settings, resolve_distill
from rapm_bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# config.json's names before objectives were a registry (plus fast_grad and compile_blocks, issue 14): every run
# folder written so far has (a subset of) these
FLAT_KEYS = {
    "betas", "cache_dir", "checkpoint_every", "disc_hidden", "disc_lr", "distance", "dmd2_fake_lr", "dmd2_fake_rank",
    "dmd2_fake_steps", "dmd2_gan_weight", "dmd2_t_max", "dmd2_t_min", "compile_blocks", "fast_grad", "fast_nograd", "format",
    "grad_checkpointing",
    "grad_clip", "guidance", "huber_c", "iters", "lambda_abs", "lambda_reg", "lambda_rel", "log_every", "log_with",
    "lora_impl", "lora_targets", "lr", "num_trajectories", "objective", "out", "pcm_adv_weight", "pcm_ema",
    "pcm_huber_c", "prompt_offset", "prompts", "rank", "sample_count", "sample_every", "save_dtype", "seed",
    "slot_chunk", "slots", "store_dtype", "substeps", "trajectory_batch", "trajectory_seed", "warmup",
    "weight_decay", "world"}


@dataclass(frozen=True)
class ToyConfig:
    """A plug-in objective's own settings."""

    x: float = 1.0
    mode: str = "a"
    flag: bool = False
    lr: float | None = None
    ks: tuple[int, ...] = (1, 2)

    def validate(self, cfg: DistillConfig, active: bool) -> None:
        if self.x < 0:
            raise UserError(f"toy.x must be at least 0, got {self.x}")
        if active and self.mode not in ("a", "b"):
            raise UserError(f"toy.mode must be a or b, got {self.mode!r}")


def toy_build(cfg, world, sched, guidance, student, probe):
    return ("toy", cfg.toy.x, guidance)


@pytest.fixture
def toy(monkeypatch):
    """The registry with a `toy` objective (its own ToyConfig) registered at run time; restored afterwards."""
    from rapm_bench import plugins

    monkeypatch.setattr(plugins, "_objectives", dict(plugins._objectives))
    return plugins.register_objective("toy", plugins.ObjectiveSpec("toy", toy_build, ToyConfig))


def cli():
    import typer

    from rapm_bench.cli_distill import distill

    app = typer.Typer()
    app.command()(distill)
    app.callback()(lambda: None)
    return app


def dry_run(*args: str) -> dict:
    result = CliRunner().invoke(cli(), ["distill", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- the registry entries ------------------------------------------------------------------------------------
def test_shipped_objectives_are_registry_entries_with_their_configs():
    """RAPM, PCM and DMD2 each register a spec: its config class (from its own module), the trajectory data it
    needs, the LoRA layers it trains on; build_objective and reproduce's plan read the registry."""
    from baselines.dmd2 import DMD2Config
    from baselines.pcm import PCMConfig
    from rapm_bench.distill.rapm_config import RAPMConfig
    from rapm_bench.plugins import get_objective
    from rapm_bench.reproduce import OBJECTIVES, planned_objectives

    specs = {n: get_objective(n) for n in ("rapm", "pcm", "dmd2")}
    assert {n: s.config for n, s in specs.items()} == {"rapm": RAPMConfig, "pcm": PCMConfig, "dmd2": DMD2Config}
    assert [s.interior for s in specs.values()] == [False, True, False]
    assert [s.flat_prefix for s in specs.values()] == ["", "pcm_", "dmd2_"]
    assert specs["rapm"].lora_impls == ("peft", "merged", "fast") and specs["pcm"].lora_impls == ("peft",)
    assert planned_objectives("tiny") == OBJECTIVES == ("rapm", "pcm", "dmd2")
    cfg = DistillConfig()
    assert (cfg.rapm, cfg.pcm, cfg.dmd2) == (RAPMConfig(), PCMConfig(), DMD2Config())
    assert cfg.pcm_huber_c == cfg.pcm.huber_c == 0.001 and cfg.lambda_abs == cfg.method().lambda_abs == 0.1


# --- a plug-in objective with its own config ----------------------------------------------------------------
def test_toy_objective_reachable_by_set_and_resolve_distill(toy):
    """`--set toy.x=...` (and resolve_distill's settings and flat `toy_x`) reach the toy's config; its validate
    runs; build_objective builds it from the registry; reproduce's plan does not train it (no cost estimate)."""
    from rapm_bench.distill.objectives import build_objective
    from rapm_bench.reproduce import planned_objectives

    cfg = resolve_distill("tiny", objective="toy", settings=["toy.x=2.5", "toy.mode=b", "toy.flag=true",
                                                             "toy.lr=none", "toy.ks=3,4"])
    assert cfg.toy == cfg.method() == ToyConfig(2.5, "b", True, None, (3, 4)) and cfg.out == "runs/distill/tiny-toy"
    assert resolve_distill("tiny", objective="toy", settings={"toy": {"x": 2.5, "mode": "b", "flag": True,
                                                                       "ks": (3, 4)}}) == cfg
    assert resolve_distill("tiny", objective="toy", toy_x=2.5, toy_mode="b", toy_flag=True, toy_ks=(3, 4)) == cfg
    assert build_objective(cfg, None, None, 2.0, [], None) == ("toy", 2.5, 2.0)
    with pytest.raises(UserError, match="toy.x must be at least 0, got -1.0"):
        resolve_distill("tiny", objective="toy", settings=["toy.x=-1"])
    with pytest.raises(UserError, match="toy.mode must be a or b"):
        resolve_distill("tiny", objective="toy", settings=["toy.mode=c"])
    assert resolve_distill("tiny", settings=["toy.mode=c"]).toy.mode == "c"  # an inactive objective's own rule
    assert "toy" not in planned_objectives("tiny")

    out = dry_run("--objective", "toy", "--set", "toy.x=3", "--set", "pcm.huber_c=0.002")
    assert (out["objective"], out["toy_x"], out["toy_mode"], out["pcm_huber_c"]) == ("toy", 3.0, "a", 0.002)
    # a config.json of a toy run round-trips; a rapm run's carries no toy fields (its JSON is as before)
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    assert "toy_x" not in json.loads(resolve_distill("tiny").to_json())
    assert resolve_distill("tiny").to_json() == DistillConfig().to_json()


# --- --set errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("item", "message"), [
    ("pcm.huber_c", "expected OBJECTIVE.FIELD=VALUE"),
    ("huber_c=0.1", "expected OBJECTIVE.FIELD=VALUE"),
    ("gan.x=1", "unknown objective 'gan'; known: rapm, pcm, dmd2"),
    ("pcm.huber=1", "objective pcm has no field 'huber'; its fields: huber_c, ema, adv_weight"),
    ("pcm.huber_c=abc", "'abc' is not a number"),
    ("dmd2.fake_rank=2.5", "'2.5' is not a whole number"),
    ("dmd2.fake_lr=fast", "'fast' is not a number"),
    ("pcm.huber_c=0", "--pcm-huber-c must be positive, got 0.0"),
    ("rapm.distance=l1", "--distance must be `gan` or `l2`, got 'l1'"),
])
def test_set_errors_are_one_line_exit_2(item, message):
    result = CliRunner().invoke(cli(), ["distill", "--dry-run", "--set", item])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_set_disagreeing_with_its_flag_is_an_error():
    with pytest.raises(UserError, match="disagrees with its flag"):
        resolve_distill("tiny", pcm_huber_c=0.002, settings=["pcm.huber_c=0.003"])
    assert resolve_distill("tiny", pcm_huber_c=0.002, settings=["pcm.huber_c=0.002"]).pcm.huber_c == 0.002
    assert parse_settings(["dmd2.fake_lr=NONE", "pcm.ema = 0.5"]) == {"dmd2": {"fake_lr": None}, "pcm": {"ema": 0.5}}


# --- old flags = --set ---------------------------------------------------------------------------------------
def test_old_flags_equal_the_set_spelling():
    """Every method flag is an alias of its --set spelling: the same resolved config."""
    flags = dry_run("--objective", "dmd2", "--lambda-abs", "0.3", "--lambda-rel", "0.2", "--lambda-reg", "0.5",
                    "--distance", "l2", "--pcm-huber-c", "0.002", "--pcm-ema", "0.9", "--pcm-adv-weight", "0.1",
                    "--dmd2-fake-rank", "4", "--dmd2-fake-lr", "3e-4", "--dmd2-fake-steps", "2",
                    "--dmd2-gan-weight", "0")
    sets = dry_run("--objective", "dmd2", *[a for kv in (
        "rapm.lambda_abs=0.3", "rapm.lambda_rel=0.2", "rapm.lambda_reg=0.5", "rapm.distance=l2", "pcm.huber_c=0.002",
        "pcm.ema=0.9", "pcm.adv_weight=0.1", "dmd2.fake_rank=4", "dmd2.fake_lr=3e-4", "dmd2.fake_steps=2",
        "dmd2.gan_weight=0") for a in ("--set", kv)])
    assert flags == sets
    assert (sets["lambda_abs"], sets["distance"], sets["pcm_ema"], sets["dmd2_fake_rank"], sets["dmd2_fake_lr"]) == \
        (0.3, "l2", 0.9, 4, 3e-4)
    kw = dict(objective="pcm", lambda_abs=0.3, pcm_huber_c=0.002, dmd2_fake_lr=1e-4)
    assert resolve_distill("tiny", **kw) == resolve_distill(
        "tiny", objective="pcm", settings=["rapm.lambda_abs=0.3", "pcm.huber_c=0.002", "dmd2.fake_lr=1e-4"])


# --- config.json ---------------------------------------------------------------------------------------------
def test_config_json_keeps_its_flat_form_and_round_trips():
    """config.json is flat as before (the same names, so run folders and `open_run`'s comparison keep working);
    from_json(to_json) is the identity; an old run's file (the committed tiny RAPM's) loads, equal to its own
    round trip and to the defaults it was trained with."""
    for cfg in (DistillConfig(), distill_preset("tiny"), distill_preset("sdxl"),
                resolve_distill("tiny", objective="pcm", pcm_ema=0.5),
                resolve_distill("sdxl", objective="dmd2", prompts="captions.txt")):
        text = cfg.to_json()
        assert set(json.loads(text)) == FLAT_KEYS
        assert DistillConfig.from_json(text) == cfg and DistillConfig.from_json(text).to_json() == text
    assert {f.name for f in fields(DistillConfig)} - {"methods"} < FLAT_KEYS

    old_text = (ROOT / "rapm_bench/assets/tiny/rapm/config.json").read_text()
    old = json.loads(old_text)
    cfg = DistillConfig.from_json(old_text)
    assert {k: cfg.flat()[k] for k in old if k != "world"} == {k: (tuple(v) if isinstance(v, list) else v)
                                                               for k, v in old.items() if k != "world"}
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TypeError, match="unknown distill config fields"):
        DistillConfig.from_json(json.dumps(old | {"pcm_nonsense": 1}))


def test_open_run_compares_nested_configs_by_their_flat_names(tmp_path):
    """A run folder whose config.json differs in a method's field names that field (config.json's name)."""
    from rapm_bench.distill.engine import open_run

    cfg = resolve_distill("tiny", out=str(tmp_path / "run"))
    open_run(tmp_path / "run", cfg, resume=False)
    open_run(tmp_path / "run", cfg, resume=False)  # the same config: fine
    with pytest.raises(UserError, match="differs in: pcm_huber_c"):
        open_run(tmp_path / "run", resolve_distill("tiny", out=str(tmp_path / "run"),
                                                   settings=["pcm.huber_c=0.002"]), resume=False)


def test_ablation_variants_override_rapm_fields_by_their_flat_names():
    """The ablation's variants (flat overrides such as lambda_rel) apply to the nested RAPM config."""
    from rapm_bench.distill.ablation import STEP_VARIANTS, VARIANTS
    from rapm_bench.distill.config import override

    base = resolve_distill("tiny", device="cpu")
    for _, _, overrides in (*VARIANTS, *STEP_VARIANTS):
        cfg = override(base, out="x", **overrides)
        assert {k: cfg.flat()[k] for k in overrides} == overrides and cfg.out == "x"
    assert override(base, lambda_rel=0.0).rapm.lambda_rel == 0.0 and override(base, iters=3).iters == 3
