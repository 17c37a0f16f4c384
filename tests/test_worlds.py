"""The world registry (rapm_bench/worlds/registry.py): one WorldSpec per world, every preset lookup through it,
an unknown world a one-line error, and no command branching on a world's name."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.config import WorldConfig, get_preset
from rapm_bench.distill.config import DistillConfig, distill_preset, resolve_distill
from rapm_bench.errors import UserError
from rapm_bench.eval.protocols import PROTOCOLS, default_protocol
from rapm_bench.reproduce import OBJECTIVES, make_plan
from rapm_bench.worlds import load_world, registry
from rapm_bench.worlds.registry import Costs, WorldSpec, get_world_spec, register_world, world_names

ROOT = Path(__file__).resolve().parents[1]
BRANCH = re.compile(r'preset ==|preset !=|== "tiny"|== "sdxl"')


def test_the_shipped_worlds_are_registered():
    assert world_names()[:2] == ("tiny", "sdxl")
    assert all(get_world_spec(n).bench_preset and get_world_spec(n).plan for n in ("tiny", "sdxl"))
    assert get_preset("sdxl") is get_world_spec("sdxl")


def test_worlds_are_entry_points(tmp_path, monkeypatch):
    """The shipped worlds are entry points of `rapm_bench.worlds` (presets.py); another package's world is found the
    same way, loaded only when asked for, and an entry point that names no WorldSpec of its name is named in the
    error; the shipped worlds cannot be unregistered."""
    from importlib.metadata import EntryPoint

    from rapm_bench import plugins, presets

    assert get_world_spec("tiny") is presets.TINY and get_world_spec("sdxl") is presets.SDXL
    (tmp_path / "toy_world.py").write_text(
        "import dataclasses\nfrom rapm_bench.presets import TINY\nSPEC = dataclasses.replace(TINY, name='toy')\n"
        "WRONG = dataclasses.replace(TINY, name='other')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = plugins.WORLDS_GROUP
    installed = [EntryPoint(n, v, group) for n, v in plugins.DECLARED[group].items()]
    installed += [EntryPoint("toy", "toy_world:SPEC", group), EntryPoint("bad", "toy_world:WRONG", group)]
    monkeypatch.setattr(plugins, "entry_points", lambda group: installed if group == plugins.WORLDS_GROUP else [])
    monkeypatch.setattr(registry, "_installed", functools.cache(registry._installed.__wrapped__))
    plugins.plugin_entry_points.cache_clear()
    try:
        assert world_names() == ("tiny", "sdxl", "toy", "bad")
        assert "toy_world" not in sys.modules  # listed, not loaded
        assert get_world_spec("toy").name == "toy" and get_world_spec("toy").batch_size == presets.TINY.batch_size
        with pytest.raises(TypeError, match=r"entry point bad = toy_world:WRONG \(rapm_bench.worlds\) is not the "
                                            r"WorldSpec of a world named 'bad'"):
            get_world_spec("bad")
        with pytest.raises(UserError, match="unknown preset 'x'; known worlds: tiny, sdxl, toy, bad"):
            get_world_spec("x")
        with pytest.raises(ValueError, match="world 'sdxl' is installed"):
            registry.unregister_world("sdxl")
    finally:
        plugins.plugin_entry_points.cache_clear()


@pytest.mark.parametrize("name", world_names())
def test_each_spec_answers_what_the_commands_ask(name):
    spec = get_world_spec(name)
    assert spec.name == name and spec.description and callable(spec.load)
    assert spec.batch_size >= 1 and spec.num_images >= 0 and spec.prompts_help
    assert spec.default_protocol in PROTOCOLS and default_protocol(name).name == spec.default_protocol
    cfg = distill_preset(name)
    assert cfg.world.preset == name and set(spec.distill) <= {f.name for f in dataclasses.fields(DistillConfig)}
    resolve_distill(name, prompts=None if spec.training_prompts else "captions.txt")  # the preset validates
    for scale in spec.bench_scales if spec.bench_preset is not None else ():
        assert spec.bench_config(scale).preset == name and spec.bench_config(scale).scale == scale
    assert spec.bench_weights in ("shipped", "random")
    if spec.plan is not None:  # reproduce runs there: its plan and the costs of its estimates
        assert make_plan(name).preset == name
        assert isinstance(spec.costs, Costs) and set(OBJECTIVES) <= set(spec.costs.iteration) and spec.costs.device
    if spec.training_prompts is not None:
        assert len(spec.training_prompts(3, 5)) == 3
    if spec.sample_prompts is not None:
        assert len(spec.sample_prompts(4)) == 4
    assert (spec.num_images > 0) == (spec.sample_prompts is not None)  # generate's default needs captions


def test_the_presets_are_the_ones_before_the_registry():
    """The values the preset tables held (config.PRESETS, DISTILL_PRESETS, DEFAULT_PROTOCOLS, COSTS)."""
    tiny, sdxl = get_world_spec("tiny"), get_world_spec("sdxl")
    assert (tiny.teacher, tiny.batch_size, tiny.num_images, tiny.default_protocol) == (None, 64, 16, "tiny")
    assert (sdxl.teacher, sdxl.batch_size, sdxl.num_images, sdxl.default_protocol) == (
        "stabilityai/stable-diffusion-xl-base-1.0", 4, 0, "coco30k")
    assert distill_preset("tiny") == DistillConfig()
    s = distill_preset("sdxl")
    assert s.world == WorldConfig(preset="sdxl", precision="bf16") and s.out == "runs/distill/sdxl"
    assert (s.num_trajectories, s.iters, s.lr, s.lora_impl, s.slot_chunk, s.guidance, s.save_dtype) == (
        1000, 20_000, 1e-4, "merged", 4, None, "fp16")
    # SDXL's RAPM iteration: the engine measured on an H100 (issue 14; 1.3 s before the registry)
    assert sdxl.costs.iteration == {"rapm": 0.473, "pcm": 2.0, "dmd2": 4.0} and sdxl.costs.device == "one H100"
    assert tiny.costs.trajectory_forward == 75 / (256 * 16 * 2) and tiny.costs.device == "a 2-core CPU"
    assert tiny.preset_flag() == "" and sdxl.preset_flag() == " --preset sdxl"


@pytest.mark.parametrize("lookup", [get_world_spec, get_preset, distill_preset, resolve_distill, default_protocol,
                                    make_plan, lambda name: load_world(WorldConfig(preset=name))])
def test_an_unknown_world_is_one_error_everywhere(lookup):
    with pytest.raises(UserError, match=r"^unknown preset 'sd3'; known worlds: tiny, sdxl"):
        lookup("sd3")


@pytest.mark.parametrize("command", [["generate"], ["eval"], ["table"], ["plot"], ["report"], ["reproduce"],
                                     ["bench"], ["check", "--baseline", "x"], ["distill"]])
def test_cli_unknown_world_exits_2_with_one_line(command):
    result = CliRunner().invoke(app, [*command, "--preset", "sd3"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines == ["rapm-bench: error: unknown preset 'sd3'; known worlds: tiny, sdxl"], result.output


def test_cli_unknown_world_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rapm_bench", "eval", "--preset", "sd3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["rapm-bench: error: unknown preset 'sd3'; known worlds: tiny, sdxl"]


def test_a_registered_world_reaches_every_lookup(monkeypatch):
    """A new world is one register_world: its presets, prompts, protocol and plan come from its spec."""
    monkeypatch.setattr(registry, "_WORLDS", dict(registry._WORLDS))  # the registration ends with the test
    tiny = get_world_spec("tiny")
    spec = register_world(dataclasses.replace(
        tiny, name="shapes2", description="a second shapes world", distill={"iters": 7, "out": "runs/s2"},
        distill_world={"precision": "fp32"}, training_prompts=None, sample_prompts=None, num_images=0,
        prompts_help="a text file", bench_scales=("full", "small"), plan=None))
    assert "shapes2" in world_names() and get_preset("shapes2") is spec
    cfg = distill_preset("shapes2")
    assert cfg.iters == 7 and cfg.world == WorldConfig(preset="shapes2", precision="fp32") and cfg.lr == 1e-3
    with pytest.raises(UserError, match="--preset shapes2 needs --prompts FILE: a text file"):
        resolve_distill("shapes2")
    assert resolve_distill("shapes2", prompts="p.txt").prompts == "p.txt"
    assert default_protocol("shapes2").name == "tiny"
    with pytest.raises(UserError, match="has no reproduce plan"):
        make_plan("shapes2")
    from rapm_bench.generate import default_prompts

    with pytest.raises(UserError, match="preset 'shapes2' needs --prompts FILE"):
        default_prompts("shapes2", 2)
    with pytest.raises(UserError, match=r"--scale small is for --preset sdxl or shapes2 \(the tiny world"):
        tiny.bench_config("small")


def test_the_tiny_world_loads_through_its_spec():
    from rapm_bench.worlds.tiny import TinyWorld

    world = get_world_spec("tiny").load(WorldConfig(device="cpu"))
    assert isinstance(world, TinyWorld) and world.image_size == 32
    with pytest.raises(UserError, match="unknown precision"):
        get_world_spec("tiny").load(WorldConfig(device="cpu", precision="fp8"))


def sources() -> list[Path]:
    """Every file `grep -rn ... rapm_bench baselines` reads, but those under rapm_bench/worlds/."""
    worlds = ROOT / "rapm_bench" / "worlds"
    return [p for folder in ("rapm_bench", "baselines") for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and worlds not in p.parents and "__pycache__" not in p.parts]


def test_no_world_name_branches_outside_worlds():
    """Which world a command is in is asked of its WorldSpec: `preset == "tiny"` style branches live in
    rapm_bench/worlds/ only (issue 15, item 2)."""
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path in sources()
            for i, line in enumerate(path.read_bytes().decode("utf-8", "ignore").splitlines(), 1)
            if BRANCH.search(line)]
    assert not hits, "branches on a world's name outside rapm_bench/worlds/ (add a WorldSpec field):\n" + \
        "\n".join(hits)
    assert any(p.name == "bench.py" for p in sources())  # the walk reads the package


def test_the_world_registry_imports_no_adapter():
    """Listing the worlds loads neither adapter (diffusers and transformers only when a world loads)."""
    code = ("import sys; from rapm_bench.worlds.registry import world_names; world_names(); "
            "print([m for m in ('rapm_bench.worlds.sdxl', 'rapm_bench.worlds.tiny', 'diffusers') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_worldspec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_world_spec("tiny").batch_size = 1  # type: ignore[misc]
    assert isinstance(get_world_spec("tiny"), WorldSpec)


def test_the_default_generation_batch_follows_the_gpus_size(monkeypatch):
    """SDXL generates 16 images a batch on a GPU of 70 GiB or more (an 80 GB card), 4 on smaller ones and off a GPU;
    a world without `large_batch` always takes its batch_size; an explicit --batch-size wins in resolve_generate."""
    from types import SimpleNamespace

    import torch

    from rapm_bench.config import GenerateConfig, resolve_generate

    card = {"gib": 79.2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(total_memory=int(card["gib"] * 2**30)))
    sdxl, tiny = get_world_spec("sdxl"), get_world_spec("tiny")
    assert sdxl.default_batch("auto") == sdxl.default_batch("cuda:0") == 16
    assert sdxl.default_batch("cpu") == sdxl.batch_size == 4
    assert tiny.default_batch("cuda") == tiny.batch_size
    card["gib"] = 47.5  # a 48 GB card
    assert sdxl.default_batch("auto") == 4
    card["gib"] = 79.2
    world = WorldConfig(preset="sdxl", device="cuda")
    assert resolve_generate(GenerateConfig(world=world, out="x", model="teacher")).batch_size == 16
    assert resolve_generate(GenerateConfig(world=world, out="x", model="teacher", batch_size=2)).batch_size == 2
