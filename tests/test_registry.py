"""The `baselines/` registry against docs/reference.md's published-model facts, and its offline behaviour."""

from __future__ import annotations

import subprocess
import sys

import pytest

from baselines import MODELS
from rapm_bench import models
from rapm_bench.models import HubFile

# (name, repo, a file name, scheduler, spacing, explicit timesteps, guidance, step counts): docs/reference.md
PUBLISHED = [
    ("rapm", "guoqiang-x/RAPM_SDXL", "RAPM_SDXL.pt", "ddim", "trailing", None, 1.0, (4,)),
    ("pcm", "wangfuyun/PCM_Weights", "pcm_sdxl_smallcfg_4step_converted.safetensors", "ddim", "trailing", None, 1.0,
     (2, 4, 8, 16)),
    ("pcm-normalcfg", "wangfuyun/PCM_Weights", "pcm_sdxl_normalcfg_4step_converted.safetensors", "ddim", "trailing",
     None, 3.0, (4, 8, 16)),
    ("dmd2", "tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors", "lcm", "trailing", (999, 749, 499, 249), 0.0,
     (4,)),
    ("lcm-lora", "latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors", "lcm", "leading", None, 1.0,
     (2, 4, 8)),
    ("lightning", "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors", "euler", "trailing", None, 0.0,
     (2, 4, 8)),
    ("hyper-sd", "ByteDance/Hyper-SD", "Hyper-SDXL-4steps-lora.safetensors", "ddim", "trailing", None, 0.0,
     (1, 2, 4, 8)),
    ("tcd", "h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors", "tcd", "trailing", None, 0.0, (2, 4, 8)),
]


@pytest.mark.parametrize(("name", "repo", "filename", "scheduler", "spacing", "timesteps", "guidance", "steps"),
                         PUBLISHED)
def test_spec_matches_reference(name, repo, filename, scheduler, spacing, timesteps, guidance, steps):
    spec = MODELS[name]
    assert spec.recipe.scheduler == scheduler and spec.recipe.timestep_spacing == spacing
    assert spec.recipe.timesteps == timesteps
    assert spec.guidance == guidance and spec.steps == steps
    source = spec.lora["sdxl"]
    files = list(source.values()) if isinstance(source, dict) else [source]
    assert all(isinstance(f, HubFile) and f.repo == repo for f in files)
    assert filename in [f.filename for f in files]
    if spec.recipe.scheduler == "ddim":  # the pitfall PCM fixed: diffusers' DDIM defaults clip and set alpha to one
        assert dict(spec.recipe.options) == {"clip_sample": False, "set_alpha_to_one": False}


def test_tcd_uses_gamma_03_and_reported_numbers_cite_a_source():
    assert MODELS["tcd"].recipe.eta == 0.3
    for spec in MODELS.values():
        for rep in spec.reported:
            assert rep.source and rep.protocol and rep.preset in ("sdxl", "tiny")


@pytest.mark.e2e
@pytest.mark.parametrize(("model", "steps", "shipped"), [("pcm", 3, "2, 4, 8, 16"), ("dmd2", 8, "4"),
                                                          ("lightning", 1, "2, 4, 8"), ("rapm", 2, "4")])
def test_eval_rejects_unshipped_step_counts(tmp_path, model, steps, shipped):
    result = subprocess.run([sys.executable, "-m", "rapm_bench", "eval", "--preset", "sdxl", "--model", model,
                             "--steps", str(steps), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and f"ships {shipped}-step" in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_published_file_offline_says_how_to_get_it(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    from rapm_bench.errors import UserError

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))  # an empty hub cache (conftest sets HF_HUB_OFFLINE)
    with pytest.raises(UserError, match="huggingface-cli download ByteDance/SDXL-Lightning"):
        MODELS["lightning"].lora_path("sdxl", 4)


def test_dmd2_timesteps_sample_without_the_lcm_origin_grid_warning():
    """DMD2's [999, 749, 499, 249] are its own schedule: LCMScheduler's off-grid warning is silenced, and only there."""
    import logging

    import torch

    from rapm_bench.sampling import LCM_DMD2, sample
    from rapm_bench.worlds.base import NoiseSchedule

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    log = logging.getLogger("diffusers.schedulers.scheduling_lcm")
    saved, keep = log.level, Keep()
    log.setLevel(logging.WARNING)  # heard whatever diffusers' verbosity is now (other tests may have lowered it)
    before = log.level
    log.addHandler(keep)
    try:
        x = sample(lambda z, t: torch.zeros_like(z), torch.randn(1, 3, 4, 4), LCM_DMD2, NoiseSchedule(), 4)
        assert torch.isfinite(x).all()
        assert not keep.records, [r.getMessage() for r in keep.records]
        assert log.level == before
        log.warning("still heard")  # the logger itself is left as it was
        assert [r.getMessage() for r in keep.records] == ["still heard"]
    finally:
        log.removeHandler(keep)
        log.setLevel(saved)


@pytest.mark.parametrize("name, command", [("pcm", "rapm-bench distill --objective pcm"),
                                           ("dmd2", "rapm-bench distill --objective dmd2"),
                                           ("rapm", "rapm-bench distill`")])
def test_not_trained_yet_names_the_command_that_trains_that_model(monkeypatch, name, command):
    """A tiny model whose package weights are missing: the one line names its own training command, not RAPM's."""
    from dataclasses import replace

    from rapm_bench.errors import UserError

    spec = replace(MODELS[name], lora={"tiny": f"assets/tiny/{name}-missing/lora.safetensors"})
    with pytest.raises(UserError, match="not trained yet") as e:
        spec.lora_path("tiny", 4)
    msg = str(e.value)
    assert "\n" not in msg and f"`{command}" in msg and "rapm-bench reproduce" in msg
    if name != "rapm":
        assert "`rapm-bench distill`" not in msg  # not the RAPM default


# --- plug-ins (rapm_bench.plugins): how the package finds the registry without importing it ---------------
@pytest.fixture()
def fresh_plugins(monkeypatch):
    """rapm_bench.plugins with empty run-time registries and cleared caches (restored afterwards)."""
    from rapm_bench import plugins

    monkeypatch.setattr(models, "_models", {})
    monkeypatch.setattr(plugins, "_objectives", dict(plugins._objectives))
    for f in (plugins.plugin_entry_points, models.installed_models):
        f.cache_clear()
    yield plugins
    for f in (plugins.plugin_entry_points, models.installed_models):
        f.cache_clear()


def test_the_registry_is_the_baselines_plugin():
    """models.registry() is baselines.MODELS (found as a plug-in, not imported), in the same order."""
    from rapm_bench.models import get_model, registry

    assert list(registry()) == list(MODELS) and all(registry()[n] is MODELS[n] for n in MODELS)
    assert get_model("pcm") is MODELS["pcm"]


def test_entry_points_load_specs_mappings_and_builders(tmp_path, monkeypatch, fresh_plugins):
    """The entry-point path, on explicitly made EntryPoints: a ModelSpec, a mapping of them, an objective builder;
    the declared entry points fill in the names the installed ones lack; a wrong object is named in the error."""
    from importlib.metadata import EntryPoint

    import baselines.pcm
    from rapm_bench.models import get_model

    (tmp_path / "toy_plugin.py").write_text(
        "from dataclasses import replace\nfrom baselines import MODELS\n"
        "SPEC = replace(MODELS['teacher'], name='toy')\nMANY = {'toy2': replace(MODELS['teacher'], name='toy2')}\n"
        "def build(cfg, world, sched, guidance, student, probe):\n    return 'toy objective'\nNOT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = fresh_plugins
    group = p.MODELS_GROUP
    assert list(models.load_models([EntryPoint("a", "toy_plugin:SPEC", group), EntryPoint("b", "toy_plugin:MANY", group)])) \
        == ["toy", "toy2"]
    assert models.load_models([EntryPoint("baselines", "baselines:MODELS", group)]) == MODELS
    with pytest.raises(TypeError, match="entry point bad = toy_plugin:NOT"):
        models.load_models([EntryPoint("bad", "toy_plugin:NOT", group)])
    with pytest.raises(ValueError, match="model 'toy' is declared twice"):
        models.load_models([EntryPoint("a", "toy_plugin:SPEC", group)] * 2)

    ours = p.entry_points(group=p.OBJECTIVES_GROUP)
    installed = {p.MODELS_GROUP: [EntryPoint("toy", "toy_plugin:SPEC", p.MODELS_GROUP)],
                 p.OBJECTIVES_GROUP: [EntryPoint("toy", "toy_plugin:build", p.OBJECTIVES_GROUP)]}
    monkeypatch.setattr(p, "entry_points", lambda group: installed[group])
    # another package's plug-in, rapm-bench's own entry points not installed (an old install): both
    assert list(models.registry()) == ["toy", *MODELS] and get_model("toy").name == "toy"
    assert p.objective_names()[-4:] == ("toy", "rapm", "pcm", "dmd2") and p.get_objective("toy")(*[None] * 6) == "toy objective"
    assert p.get_objective("pcm") is baselines.pcm.objective  # the declared fallback

    # an install made before `rapm` was declared, with another package's objective named `dmd2`: the declared
    # `rapm` fills in, the installed `dmd2` wins over the declared one
    # (`pcm`: rapm-bench's own installed entry point)
    installed[p.OBJECTIVES_GROUP] = [*(ep for ep in ours if ep.name == "pcm"),
                                     EntryPoint("dmd2", "toy_plugin:build", p.OBJECTIVES_GROUP)]
    assert installed[p.OBJECTIVES_GROUP][0].dist.name.replace("_", "-") == "rapm-bench"
    for f in (p.plugin_entry_points, p._load_objective):
        f.cache_clear()
    assert p.objective_names() == ("pcm", "dmd2", "rapm")
    assert p.get_objective("rapm").name == "rapm" and p.get_objective("dmd2")(*[None] * 6) == "toy objective"


def test_register_model_and_objective_at_run_time(fresh_plugins):
    """A model and an objective added from a test reach get_model, --objective's check and build_objective."""
    from dataclasses import replace

    from rapm_bench.distill.config import known_objectives, resolve_distill
    from rapm_bench.distill.objectives import build_objective
    from rapm_bench.errors import UserError
    from rapm_bench.models import get_model

    p = fresh_plugins
    models.register_model(replace(MODELS["teacher"], name="toy-teacher"))
    assert get_model("toy-teacher").name == "toy-teacher" and "toy-teacher" not in MODELS
    with pytest.raises(UserError, match="--objective must be one of rapm, pcm, dmd2, got 'toy'"):
        resolve_distill("tiny", objective="toy")
    p.register_objective("toy", lambda cfg, world, sched, guidance, student, probe: ("toy", guidance))
    assert known_objectives() == ("rapm", "pcm", "dmd2", "toy")
    cfg = resolve_distill("tiny", objective="toy", device="cpu")
    assert build_objective(cfg, None, None, 2.0, [], None) == ("toy", 2.0)
    with pytest.raises(ValueError, match="unknown objective 'gone'; known: rapm, pcm, dmd2, toy"):
        build_objective(replace(cfg, objective="gone"), None, None, 2.0, [], None)
