"""`python -m rapm_bench.scaling`: the small build through the real loaders, the summary, and the whole
measurement with 1 and 2 CPU processes (FID equal across G, trajectory caches identical)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rapm_bench import scaling
from rapm_bench.eval import protocols

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> scaling.Settings:
    """A small build: tiny-width SDXL pipeline, 6 synthetic COCO pairs, stand-in Inception, small CLIP."""
    s = scaling.Settings(work=tmp_path_factory.mktemp("scaling"), small=True, num_images=6, resolution=64,
                         trajectories=2, trajectory_batch=1, batch_size=None)
    assert scaling.build(s, CPU) == ["teacher", "coco", "inception", "clip", "clip-config"]
    return s


def test_full_size_text_encoders_fit_the_sdxl_unet():
    from rapm_bench.bench import SDXL_UNET

    clip_l, big_g = scaling.text_encoder_configs(small=False)
    assert (clip_l["hidden_size"], clip_l["num_hidden_layers"]) == (768, 12)
    assert (big_g["hidden_size"], big_g["num_hidden_layers"], big_g["projection_dim"]) == (1280, 32, 1280)
    assert SDXL_UNET["cross_attention_dim"] == clip_l["hidden_size"] + big_g["hidden_size"]
    assert SDXL_UNET["projection_class_embeddings_input_dim"] == (big_g["projection_dim"]
                                                                  + 6 * SDXL_UNET["addition_time_embed_dim"])


@pytest.mark.e2e
def test_settings_round_trip_through_the_worker_arguments(built):
    from dataclasses import replace

    assert scaling.settings(scaling.parse_args(built.argv())) == built
    for blocks in (True, False):
        assert scaling.settings(scaling.parse_args(replace(built, compile_blocks=blocks).argv())).compile_blocks is blocks
    for half in ("bounded", "everywhere", ""):  # "" is `--vae-half-convolutions off`
        assert scaling.settings(scaling.parse_args(replace(built, half_convolutions=half).argv())).half_convolutions == half
    for overlap in (True, False):
        assert scaling.settings(scaling.parse_args(replace(built, overlap_scoring=overlap).argv())).overlap_scoring \
            is overlap
    for half in (True, False):
        assert scaling.settings(scaling.parse_args(replace(built, half_attention=half).argv())).half_attention is half


@pytest.mark.e2e
def test_small_build_is_reused_and_loads_through_the_real_loaders(built, monkeypatch):
    """teacher -> SDXL world; `data coco` -> reference statistics; Inception and CLIP -> the protocol's scorer."""
    from rapm_bench.config import WorldConfig
    from rapm_bench.eval.scorers import load_scorer
    from rapm_bench.generate import generate_batch
    from rapm_bench.sampling import DDIM_TRAILING
    from rapm_bench.worlds import load_world

    assert scaling.build(built, CPU) == []
    monkeypatch.setattr(protocols, "PROTOCOLS", dict(protocols.PROTOCOLS))
    proto = scaling.register(built)
    assert protocols.get_protocol(proto.name).num_pairs == 6
    assert scaling.prepare_reference(built, proto, CPU).is_file()
    world = load_world(WorldConfig(preset="sdxl", teacher=str(built.teacher), device="cpu", resolution=64))
    images = generate_batch(world, ["a cat on a sofa", "a bus"], [0, 1], DDIM_TRAILING, 4, 1.0)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    scorer = load_scorer(proto, CPU, built.inception, built.clip)
    assert scorer.features(images).shape == (2, 2048)
    assert torch.isfinite(scorer.clip_scores(images, ["a cat on a sofa", "a bus"])).all()


@pytest.mark.e2e
def test_prepared_inputs_give_the_same_scores(built, monkeypatch):
    """eval's worker prepares a group's crops and resizes; scoring from them = scoring the images directly."""
    from rapm_bench.eval.scorers import load_scorer

    monkeypatch.setattr(protocols, "PROTOCOLS", dict(protocols.PROTOCOLS))
    scorer = load_scorer(scaling.register(built), CPU, built.inception, built.clip)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 80, 64), generator=gen, dtype=torch.uint8)  # not square: a crop too
    captions = ["a cat on a sofa", "a bus", "two dogs"]
    direct = scorer.features(images), scorer.clip_scores(images, captions)
    prepared = scorer.prepare(images)
    assert set(prepared.inputs) == {"features", "clip"}

    def no_cpu_work(*args: object) -> None:
        raise AssertionError("prepared inputs were computed again")

    with monkeypatch.context() as m:
        m.setattr(scorer.extractor, "inputs", no_cpu_work)
        m.setattr(scorer.clip.embedder, "image_inputs", no_cpu_work)
        with scorer.using(prepared):
            assert torch.equal(scorer.features(images), direct[0])
            assert torch.equal(scorer.clip_scores(images, captions), direct[1])
    with scorer.using(prepared):  # another tensor, even an equal one, is prepared afresh
        assert torch.equal(scorer.features(images.clone()), direct[0])
    assert scorer._prepared is None


def _cache(folder: Path, value: float) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"z_tilde": torch.full((1, 2), value)}, str(folder / "shard_0000000.safetensors"))
    return folder


def test_extrapolation_counts_the_tail_once():
    """30K images: load + first group + the other images at the steady rate + the tail, once."""
    t = {"load_s": 20.0, "first_group_s": 50.0, "first_group_images": 64, "steady_images_per_s": 10.0, "tail_s": 3.0}
    assert scaling.extrapolate(t, 30_000) == pytest.approx(20 + 50 + (30_000 - 64) / 10 + 3)
    assert scaling.extrapolate(t | {"steady_images_per_s": None}, 30_000) is None


def test_summary_speedups_and_agreement(tmp_path):
    def run(g: int, loop: float, fid: float, traj: float, cache: Path) -> dict:
        return {"processes": g, "eval_wall_s": 10 + loop, "launch_s": 20 + loop, "fid": fid, "clip_score": 30.0,
                "device": "cpu", "timing": {"load_s": 10.0, "loop_s": loop, "images_per_s": 100 / loop},
                "trajectories": {"seconds": traj, "folder": str(cache)}}

    a, b, c = _cache(tmp_path / "a", 1.0), _cache(tmp_path / "b", 1.0), _cache(tmp_path / "c", 2.0)
    rows = scaling.summarize([run(1, 40.0, 12.0, 8.0, a), run(2, 20.0, 12.0 + 1e-9, 4.0, b),
                              run(4, 10.0, 12.1, 2.0, c)])
    assert [r["speedup_loop"] for r in rows] == [1.0, 2.0, 4.0]
    assert rows[1]["speedup_wall"] == pytest.approx(50 / 30) and rows[2]["trajectories_speedup"] == 4.0
    assert [r["fid_equal"] for r in rows] == [True, True, False]
    assert [r["trajectories_identical"] for r in rows] == [True, True, False]
    assert "x loop" in scaling.table(rows)
    assert rows[0]["eval_30k_extrapolated_s"] is None  # no steady rate recorded
    steady = run(1, 40.0, 12.0, 8.0, a)
    steady["timing"] |= {"first_group_s": 12.0, "first_group_images": 64, "steady_images_per_s": 5.0,
                         "tail_s": 0.5, "compiled_blocks": True}
    row = scaling.summarize([steady])[0]
    assert row["eval_30k_extrapolated_s"] == pytest.approx(10.0 + 12.0 + 29_936 / 5.0 + 0.5) and row["compiled_blocks"]


def test_gpus_must_start_at_one(tmp_path):
    s = scaling.Settings(tmp_path, True, 8, 64, 4, None, None)
    with pytest.raises(scaling.UserError, match="must start at 1"):
        scaling.measure(s, [2, 4], tmp_path, [])
    with pytest.raises(scaling.UserError, match="needs as many captions"):
        scaling.measure(scaling.Settings(tmp_path, True, 8, 64, 9, None, None), [1, 2], tmp_path, [])


@pytest.mark.slow
def test_one_and_two_processes_agree_end_to_end(tmp_path):
    """136 images: shard groups of 64 split 72 / 64 across 2 processes; 4 trajectories in 2 shards."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rapm_bench.scaling", "--small", "--gpus", "1,2", "--num-images", "136",
         "--trajectories", "4", "--trajectory-batch", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((out / "scaling-small-cpu.json").read_text())
    one, two = rec["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["fid_equal"] and two["fid_abs_diff"] <= 1e-6 * one["fid"]
    assert two["clip_abs_diff"] <= 1e-9 * abs(one["clip_score"])  # every process on as many CPU threads
    assert two["trajectories_identical"]
    for key in ("load_s", "loop_s", "images_per_s", "speedup_loop", "speedup_wall", "trajectories_s",
                "trajectories_speedup", "first_group_s", "steady_images_per_s", "eval_30k_extrapolated_s"):
        assert two[key] > 0, key
    assert rec["settings"]["num_images"] == 136 and rec["settings"]["trajectories"]["num"] == 4
    assert rec["versions"]["torch"] and rec["command"].startswith("python -m rapm_bench.scaling")
    assert "x loop" in proc.stdout
