"""Bad input, as a new user meets it (issue 8, part 2; parts 3 and 4 where they are bad input).

Each case runs the real command line in a subprocess (`python -m rapm_bench ...`) and checks
what the user sees: exit code 2, exactly one line on stderr that starts with
`rapm-bench: error:` and says what is wrong (and how to fix it), no traceback, and no output
folder or file left behind. Cases already covered elsewhere are not repeated here (see
RELIABILITY.md): `tests/test_cli.py::test_generate_bad_input` (11 generate cases),
`tests/test_coco.py` (COCO inputs at the library level), `tests/test_lora_files.py`,
`tests/test_report.py`, `tests/test_eval_engine.py::test_eval_bad_input`.

Numerical faults and untrusted weights that need a monkeypatch (GPU out-of-memory on a CPU,
NaN features, a replaced hub file) are checked at the library level at the end.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rapm_bench.errors import UserError

pytestmark = pytest.mark.e2e  # every case runs `python -m rapm_bench` in a subprocess

ROOT = Path(__file__).resolve().parents[1]
MARK = Path("/tmp/rapm-bench-bad-input-pwned")

# A module of the shipped tiny teacher's UNet and its weight shape (out, in).
TINY_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TINY_SHAPE = (64, 64)
# SDXL UNet modules (diffusers names) and their (out, in): what an SDXL LoRA holds.
SDXL_MODULES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k": (1280, 2048),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (1280, 5120),
}


# --- running the command line ---------------------------------------------------------------------
def run_cli(args: list[str], cwd: Path, env: dict[str, str], code: str | None = None) -> subprocess.CompletedProcess:
    """`python -m rapm_bench ARGS` (or `python -c CODE ARGS`) in a subprocess: what a user sees. `env` is
    conftest's, less its PYTHONWARNINGS=ignore: a warning printed beside the error is part of what is checked."""
    env = {k: v for k, v in env.items() if k != "PYTHONWARNINGS"} | (
        {"PYTHONWARNINGS": os.environ["PYTHONWARNINGS"]} if "PYTHONWARNINGS" in os.environ else {})
    head = ["-c", code] if code else ["-m", "rapm_bench"]
    return subprocess.run([sys.executable, *head, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ ")  # a tqdm bar of work that had started (not error text)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, one stderr line `rapm-bench: error: ...` holding every needle, no traceback.

    Progress-bar lines of work already under way when the error came are not counted.
    """
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("rapm-bench: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove nothing was written or changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- input files ---------------------------------------------------------------------------------
def lora_file(path: Path, modules: dict[str, tuple[int, int]], rank: int = 1, fill: float | None = None) -> Path:
    """A diffusers-keyed LoRA for the given modules (random, or filled with `fill`)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        a, b = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
        if fill is not None:
            a.fill_(fill)
            b.fill_(fill)
        tensors[f"unet.{name}.lora_A.weight"] = a
        tensors[f"unet.{name}.lora_B.weight"] = b
    save_file(tensors, str(path))
    return path


class Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bad input file the cases name, built once."""
    d = tmp_path_factory.mktemp("inputs")
    lora_file(d / "shapes.safetensors", {TINY_MODULE: TINY_SHAPE, TINY_MODULE.replace("to_q", "to_k"): (64, 67)})
    lora_file(d / "keys.safetensors", {TINY_MODULE: TINY_SHAPE, "down_blocks.9.no_such.proj": (8, 8)})
    lora_file(d / "sdxl.safetensors", SDXL_MODULES, rank=4)
    lora_file(d / "nan.safetensors", {TINY_MODULE: TINY_SHAPE}, fill=float("nan"))
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, str(d / "no-unet.safetensors"))
    (d / "garbage.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with open(d / "evil.bin", "wb") as f:
        pickle.dump({"unet.x.lora_A.weight": Evil()}, f)
    (d / "a-file").write_text("not a folder\n")
    (d / "grid-dir").mkdir()
    other = d / "other-run"  # a folder holding another generate run's files
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": "pcm", "steps": 8}))
    (other / "000000.png").write_bytes(b"\x89PNG another run")
    return d


# --- generate ------------------------------------------------------------------------------------
GENERATE = [
    ("lora-shapes", ["--lora", "{in}/shapes.safetensors"], ["does not fit", "other shapes",
                                                              "keys or shapes do not match"]),
    ("lora-keys", ["--lora", "{in}/keys.safetensors"], ["does not fit", "modules it does not have",
                                                          "down_blocks.9.no_such.proj"]),
    ("lora-other-base-model", ["--lora", "{in}/sdxl.safetensors"], ["made for another base model",
                                                                      "--preset/--teacher"]),
    ("lora-no-unet-keys", ["--lora", "{in}/no-unet.safetensors"], ["holds no UNet LoRA weights"]),
    ("lora-garbage", ["--lora", "{in}/garbage.safetensors"], ["cannot read LoRA file"]),
    ("lora-code-pickle", ["--lora", "{in}/evil.bin"], ["refused to load", "more than tensors",
                                                        "could run code", ".safetensors"]),
    ("lora-missing", ["--lora", "{in}/nope.safetensors"], ["LoRA file not found"]),
    ("guidance-too-high", ["--guidance", "51"], ["--guidance must be between 0 and 50"]),
    ("steps-negative", ["--steps", "-3"], ["--steps must be at least 1"]),
    ("num-images-0", ["--num-images", "0"], ["--num-images must be at least 1"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size must be at least 1"]),  # 0 is not "the default"
    ("dmd2-steps", ["--model", "dmd2", "--steps", "8"], ["ships 4-step weights only"]),
    ("pcm-steps", ["--model", "pcm", "--steps", "3"], ["ships 2, 4, 8, 16-step weights only"]),
    ("sdxl-needs-prompts", ["--preset", "sdxl", "--model", "teacher", "--teacher", "{in}"],
     ["needs --prompts"]),
    ("precision", ["--precision", "fp8"], ["unknown precision"]),
    ("device-unknown", ["--device", "tpu9"], ["unknown --device", "cpu"]),
    ("out-is-a-file", ["--out", "{in}/a-file"], ["is a file, not a folder"]),
    ("out-holds-another-run", ["--out", "{in}/other-run"], ["holds another run's files", "choose another --out"]),
    ("grid-is-a-folder", ["--grid", "{in}/grid-dir"], ["is a folder", "grid.png"]),
]
if not torch.cuda.is_available():
    GENERATE.append(("device-cuda-without-gpu", ["--device", "cuda"], ["no CUDA GPU", "--device cpu"]))


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in GENERATE], ids=[c[0] for c in GENERATE])
def test_generate(tmp_path, env, inputs, args, needles):
    MARK.unlink(missing_ok=True)
    before = snapshot(inputs)
    out = tmp_path / "out"
    args = [a.replace("{in}", str(inputs)) for a in args]
    defaults = [opt for opt in (["--num-images", "2"], ["--steps", "1"]) if opt[0] not in args]
    full = ["generate", "--out", str(out), *sum(defaults, []), *args]
    assert_one_line_error(run_cli(full, tmp_path, env), *needles)
    assert not out.exists(), "bad input must leave no output folder behind"
    assert snapshot(inputs) == before, "bad input must not touch the user's files"
    assert not MARK.exists(), "the pickle's code ran"


def test_generate_nan_lora_is_stopped(tmp_path, env, inputs):
    """A LoRA full of NaN: an explained error, not black images (config.json is written first, no PNG)."""
    out = tmp_path / "out"
    proc = run_cli(["generate", "--out", str(out), "--num-images", "2", "--steps", "1", "--lora",
                    str(inputs / "nan.safetensors")], tmp_path, env)
    assert_one_line_error(proc, "NaN/Inf latents for 2 of 2 images", "check the LoRA")
    assert not list(out.glob("*.png")) and not (out / "manifest.json").exists()


# A count out of range is refused before torch is imported: under a second, not the 4+ s of loading torch.
TORCH_FREE = """import atexit, sys
atexit.register(lambda: 'torch' in sys.modules and print('torch was imported', file=sys.stderr))
from rapm_bench.cli import main
main()"""


@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "--batch-size", "-1"], "--batch-size must be at least 1"),  # 0: GENERATE's cases
    (["generate", "--num-images", "-3"], "--num-images must be at least 1"),
    (["eval", "--batch-size", "-2"], "--batch-size must be at least 1"),
    (["eval", "--num-images", "1"], "--num-images must be at least 2 for a covariance"),
], ids=["generate-batch", "generate-images", "eval-batch", "eval-images"])
def test_counts_are_refused_before_torch_is_imported(tmp_path, env, args, needle):
    assert_one_line_error(run_cli(args, tmp_path, env, code=TORCH_FREE), needle)
    assert not list(tmp_path.iterdir()), "bad input must leave nothing behind"


# --- eval ----------------------------------------------------------------------------------------
EVAL = [
    ("unknown-preset", ["--preset", "sdxl15"], ["unknown preset"]),
    ("steps-0", ["--model", "teacher", "--steps", "0"], ["--steps must be at least 1"]),
    ("unshipped-steps", ["--model", "dmd2", "--steps", "2"], ["ships 4-step weights only"]),
    ("guidance-out-of-range", ["--model", "teacher", "--guidance", "-0.5"], ["--guidance must be between"]),
    ("num-images-0", ["--model", "teacher", "--num-images", "0"], ["at least 2"]),  # 0 is not "all of them"
    ("num-images-past-captions", ["--model", "teacher", "--num-images", "2001"],
     ["more than the 2000 caption pairs"]),
    ("batch-size-zero", ["--model", "teacher", "--num-images", "4", "--batch-size", "0"],
     ["--batch-size must be at least 1"]),
    ("coco-protocol-without-data", ["--model", "teacher", "--protocol", "coco30k"],
     ["no caption pairs for protocol coco30k", "rapm-bench data coco"]),
    ("lora-other-base-model", ["--model", "lora:{in}/sdxl.safetensors", "--num-images", "4"],
     ["made for another base model"]),
    ("lora-missing", ["--model", "lora:{in}/nope.safetensors", "--num-images", "4"], ["LoRA file not found"]),
    ("out-is-a-file", ["--model", "teacher", "--out", "{in}/a-file"], ["is a file, not a folder"]),
    ("save-images-into-another-run", ["--model", "teacher", "--num-images", "4", "--save-images",
                                      "{in}/other-run"], ["holds another run's files", "--save-images"]),
    ("device-unknown", ["--model", "teacher", "--num-images", "4", "--device", "gpu"], ["unknown --device"]),
]


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in EVAL], ids=[c[0] for c in EVAL])
def test_eval(tmp_path, env, inputs, args, needles):
    before = snapshot(inputs)
    out = tmp_path / "results"
    args = [a.replace("{in}", str(inputs)) for a in args]
    if "--out" not in args:
        args = ["--out", str(out), *args]
    assert_one_line_error(run_cli(["eval", *args], tmp_path, env), *needles)
    assert not out.exists(), "bad input must leave no result folder behind"
    assert snapshot(inputs) == before


# --- data coco (the protocol shrunk to 6 pairs and a 48-d stand-in for Inception) -----------------
COCO_LAUNCHER = """
import dataclasses, sys, torch
from rapm_bench.eval import features, protocols
small = dataclasses.replace(protocols.PROTOCOLS["coco30k"], num_pairs=6)
protocols.PROTOCOLS = {**protocols.PROTOCOLS, "coco30k": small}
class MeanPool:
    name, dim, weights_sha256 = "meanpool", 48, "0123456789abcdef"
    def __call__(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
features.load_extractor = lambda *a, **k: MeanPool()
sys.argv = ["rapm-bench", *sys.argv[1:]]
from rapm_bench.cli import main
main()
"""


def coco_files(d: Path, n: int = 6) -> tuple[Path, Path]:
    """A small captions_val2014.json and its JPEGs (as in tests/test_coco.py)."""
    import numpy as np
    from PIL import Image

    images, annotations = [], []
    img_dir = d / "val2014"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        name = f"COCO_val2014_{k + 1:012d}.jpg"
        images.append({"id": k + 1, "file_name": name})
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(img_dir / name)
        annotations.append({"id": 100 + k, "image_id": k + 1, "caption": f"a photo number {k}"})
    ann = d / "captions_val2014.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return ann, img_dir


def _coco_case(case: str, d: Path) -> tuple[Path, Path]:
    """Annotations and images folder for one case."""
    ann, img_dir = coco_files(d)
    if case == "missing-annotations":
        ann.unlink()
    elif case == "annotations-not-json":
        ann.write_text('{"images": [{"id": 1, ')
    elif case == "annotations-not-captions":
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                   "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 4, 4]}]}))
    elif case == "annotations-no-lists":
        ann.write_text(json.dumps([{"caption": "a cat"}]))
    elif case == "annotations-non-utf8":
        ann.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    elif case == "too-few-images":
        data = json.loads(ann.read_text())
        ann.write_text(json.dumps({"images": data["images"][:3], "annotations": data["annotations"][:3]}))
    elif case == "images-missing":
        for p in sorted(img_dir.iterdir())[:2]:
            p.unlink()
    elif case == "image-unreadable":
        for p in img_dir.iterdir():
            p.write_bytes(b"\xff\xd8\xff not a jpeg")
    elif case == "images-folder-missing":
        img_dir = d / "nowhere"
    return ann, img_dir


COCO = [
    ("missing-annotations", ["captions_val2014.json not found", "--annotations"]),
    ("annotations-not-json", ["is not valid JSON", "download annotations_trainval2014.zip"]),
    ("annotations-not-captions", ["malformed caption entry", "an instances file?"]),
    ("annotations-no-lists", ["is not a COCO captions file"]),
    ("annotations-non-utf8", ["cannot read"]),
    ("too-few-images", ["holds 3 captioned images", "needs 6"]),
    ("images-missing", ["2 images the caption list names are missing", "download val2014.zip"]),
    ("image-unreadable", ["unreadable image", "download val2014.zip"]),
    ("images-folder-missing", ["val2014 images folder not found"]),
]


@pytest.mark.parametrize("case,needles", COCO, ids=[c[0] for c in COCO])
def test_data_coco(tmp_path, env, case, needles):
    ann, img_dir = _coco_case(case, tmp_path / "coco")
    cache = tmp_path / "cache"
    proc = run_cli(["data", "coco", "--annotations", str(ann), "--images", str(img_dir), "--cache-dir", str(cache),
                    "--batch-size", "4"], tmp_path, env, code=COCO_LAUNCHER)
    assert_one_line_error(proc, *needles)
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be written into the cache"


def test_data_coco_launcher_works(tmp_path, env):
    """The launcher's stand-ins do not hide the real path: good inputs write the pair list, the reference statistics
    and the reference features (KID)."""
    ann, img_dir = coco_files(tmp_path / "coco")
    proc = run_cli(["data", "coco", "--annotations", str(ann), "--images", str(img_dir), "--cache-dir",
                    str(tmp_path / "cache")], tmp_path, env, code=COCO_LAUNCHER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 3 and any(n.endswith(".pairs.json") for n in names), names
    assert any(".features" in n for n in names) and any(n.endswith(".fid.npz") for n in names), names


def test_data_coco_without_inception_weights(tmp_path, env):
    """Unpatched: what a user without the Inception file meets first."""
    ann, img_dir = coco_files(tmp_path / "coco", 2)
    proc = run_cli(["data", "coco", "--annotations", str(ann), "--images", str(img_dir), "--cache-dir",
                    str(tmp_path / "cache"), "--inception", str(tmp_path / "missing.pt")], tmp_path, env)
    assert_one_line_error(proc, "Inception weights not found")
    assert not (tmp_path / "cache").exists()


# --- check ---------------------------------------------------------------------------------------
def result_file(path: Path, protocol: str = "tiny", protocol_hash: str = "abc123def456", **kw) -> Path:
    """A result record shaped like `rapm-bench eval`'s output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"model": "teacher", "steps": 4, "guidance": 3.0, "preset": "tiny", "protocol": protocol,
           "protocol_hash": protocol_hash, "num_images": 256, "fid": 12.5, "clip_score": 28.0,
           "retrieval_accuracy": 0.8} | kw
    path.write_text(json.dumps(rec))
    return path


CHECK = [
    ("other-protocol", ["--results", "{d}/coco.json"], ["made with protocol coco30k", "not comparable"]),
    ("not-a-result", ["--results", "{d}/manifest.json"], ["is not a rapm-bench result", "missing"]),
    ("missing-results", ["--results", "{d}/nope.json"], ["no such result file or folder"]),
    ("other-num-images", ["--results", "{d}/n128.json"], ["differ in num_images"]),
    ("negative-tolerance", ["--results", "{d}/base.json", "--fid-tol", "-1"], ["must be non-negative"]),
]


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in CHECK], ids=[c[0] for c in CHECK])
def test_check(tmp_path, env, args, needles):
    d = tmp_path / "r"
    result_file(d / "base.json")
    result_file(d / "coco.json", protocol="coco30k", protocol_hash="0f0f0f0f0f0f", preset="sdxl")
    result_file(d / "n128.json", num_images=128)
    (d / "manifest.json").write_text(json.dumps({"model": {"name": "teacher"}, "images": []}))
    before = snapshot(d)
    args = [a.replace("{d}", str(d)) for a in args]
    assert_one_line_error(run_cli(["check", "--baseline", str(d / "base.json"), *args], tmp_path, env), *needles)
    assert snapshot(d) == before


# --- distill (the engine is out of this file's hands: see RELIABILITY.md for what it leaves) -------
DISTILL = [
    ("unknown-preset", ["--preset", "nano"], ["unknown preset"]),
    ("iters-negative", ["--iters", "-1"], ["--iters must be at least 0"]),
    ("cfg-out-of-range", ["--cfg", "100"], ["--cfg must be between 0 and 50"]),
    ("lr-negative", ["--lr", "-1"], ["learning rates must be positive"]),
    ("format-unknown", ["--format", "ckpt"], ["--format must be"]),
    ("lora-impl-unknown", ["--lora-impl", "lowrank"], ["--lora-impl must be one of peft, merged, fast"]),
    ("lora-impl-merged-pcm", ["--objective", "pcm", "--lora-impl", "merged"], ["trains the rapm objective only"]),
    ("lora-impl-fast-dmd2", ["--objective", "dmd2", "--lora-impl", "fast"], ["--lora-impl fast trains the rapm"]),
]


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in DISTILL], ids=[c[0] for c in DISTILL])
def test_distill(tmp_path, env, args, needles):
    out = tmp_path / "run"
    assert_one_line_error(run_cli(["distill", "--out", str(out), *args], tmp_path, env), *needles)
    assert not out.exists()


REPRODUCE = [
    ("seeds-zero", ["--seeds", "0"], ["--seeds must be at least 1"]),
    ("seeds-on-sdxl", ["--preset", "sdxl", "--seeds", "2"], ["--seeds, --steps and --sweep apply to the tiny preset"]),
    ("num-images-zero", ["--num-images", "0"], ["--num-images must be at least 2"]),  # 0 is not "the plan's"
    ("steps-zero", ["--steps", "0"], ["--steps must list step counts of at least 1"]),
    ("steps-not-numbers", ["--steps", "1,four"], ["--steps must be comma-separated integers"]),
    ("sweep-on-sdxl", ["--preset", "sdxl", "--sweep"], ["apply to the tiny preset"]),
    ("jobs-zero", ["--jobs", "0"], ["--jobs must be at least 1"]),
]


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in REPRODUCE], ids=[c[0] for c in REPRODUCE])
def test_reproduce(tmp_path, env, args, needles):
    out, runs = tmp_path / "res", tmp_path / "runs"
    assert_one_line_error(run_cli(["reproduce", "--out", str(out), "--runs", str(runs), *args], tmp_path, env),
                          *needles)
    assert not out.exists() and not runs.exists()


def test_distill_out_holding_a_generate_run(tmp_path, env, inputs):
    assert_one_line_error(run_cli(["distill", "--out", str(inputs / "other-run"), "--iters", "1"], tmp_path, env),
                          "holds")


def test_distill_bad_prompts_leave_nothing(tmp_path, env, inputs):
    (tmp_path / "empty.txt").write_text("\n")
    out = tmp_path / "run"
    proc = run_cli(["distill", "--out", str(out), "--prompts", str(tmp_path / "empty.txt")], tmp_path, env)
    assert_one_line_error(proc, "holds no captions")
    assert not out.exists()


# --- untrusted weights ---------------------------------------------------------------------------
def test_every_torch_load_is_weights_only():
    """Static guard: a .pt/.bin is never unpickled with code execution allowed anywhere in the package."""
    import re

    offenders = []
    for path in (ROOT / "rapm_bench").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
        if "pickle.load(" in text or "pickle.loads(" in text:
            offenders.append(f"{path.relative_to(ROOT)}: pickle.load")
    assert not offenders, offenders


def test_a_folder_prefers_safetensors_to_pickles(tmp_path):
    from rapm_bench.lora import resolve_lora_path

    for name in ("pytorch_lora_weights.bin", "lora.safetensors", "checkpoint.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_lora_path(tmp_path) == tmp_path / "lora.safetensors"


def test_pinned_hub_file_is_checked_against_its_sha256(tmp_path, monkeypatch):
    import hashlib

    import huggingface_hub

    from rapm_bench.models import HubFile

    weights = tmp_path / "lora.safetensors"
    weights.write_bytes(b"published weights")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(weights))
    good = hashlib.sha256(b"published weights").hexdigest()
    assert HubFile("org/repo", "lora.safetensors", sha256=good).fetch() == weights
    assert HubFile("org/repo", "lora.safetensors").fetch() == weights  # not pinned: no check
    with pytest.raises(UserError, match=r"hashes to [0-9a-f]{12}…, not the pinned 000000000000…: the file is "
                                        r"corrupt or was replaced upstream; delete it .*--lora PATH"):
        HubFile("org/repo", "lora.safetensors", sha256="0" * 64).fetch()


# --- numerical faults ----------------------------------------------------------------------------
def _stats(n: int, d: int, seed: int):
    from rapm_bench.eval.fid import FeatureStats

    s = FeatureStats()
    s.update(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return s


def test_fid_of_nan_features_is_an_explained_error():
    from rapm_bench.eval.fid import FIDError, checked_fid

    good, bad = _stats(40, 8, 0), _stats(40, 8, 1)
    bad.sum[3] = float("nan")
    with pytest.raises(FIDError, match=r"the generated FID features hold NaN or Inf \(1 of 8 dimensions .*40 "
                                       r"images\): the feature network's weights"):
        checked_fid(bad, good, ("generated", "reference"))
    bad.sum_sq[0, 0] = float("inf")
    with pytest.raises(FIDError, match="the second FID features hold NaN or Inf"):
        checked_fid(good, bad)
    assert isinstance(FIDError("x"), UserError) and isinstance(FIDError("x"), ValueError)


def test_fid_singular_covariance_is_an_explained_error(monkeypatch):
    """A covariance product whose square root stays non-finite even with eps: say so, never return NaN."""
    import numpy as np

    from rapm_bench.eval import fid

    a, b = _stats(40, 8, 0), _stats(40, 8, 1)
    monkeypatch.setattr(fid, "_sqrtm", lambda m: np.full_like(m, np.nan))
    with pytest.raises(fid.FIDError, match=r"singular even with eps regularisation; use more images \(at least 8\)"):
        fid.checked_fid(a, b)


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _oom_batches(*args, **kwargs):
    """`generate_batches` running out of GPU memory in its first batch."""
    yield _oom()


def test_generate_out_of_gpu_memory_names_batch_size(tmp_path, monkeypatch):
    from rapm_bench import generate
    from rapm_bench.config import GenerateConfig, WorldConfig

    monkeypatch.setattr(generate, "generate_batches", _oom_batches)
    cfg = GenerateConfig(world=WorldConfig(device="cpu"), out=str(tmp_path / "o"), model="teacher", steps=1,
                         num_images=4, batch_size=4)
    with pytest.raises(UserError, match=r"out of GPU memory while generating 4 images: pass a smaller --batch-size "
                                        r"\(now 4, try 2\)"):
        generate.generate(cfg)
    assert not list((tmp_path / "o").glob("*.png"))


def test_eval_out_of_gpu_memory_names_batch_size(tmp_path, monkeypatch):
    from rapm_bench.config import EvalConfig, WorldConfig
    from rapm_bench.eval import engine, reference

    monkeypatch.setattr(reference, "reference_stats", lambda *a, **k: _stats(40, 8, 0))
    monkeypatch.setattr(engine, "generate_batches", _oom_batches)
    cfg = EvalConfig(world=WorldConfig(device="cpu"), model="teacher", steps=1, num_images=4, batch_size=1,
                     out=str(tmp_path / "r"))
    with pytest.raises(UserError, match=r"out of GPU memory while generating 1 images: --batch-size is already 1; "
                                        r"free GPU memory"):
        engine.evaluate(cfg)
    monkeypatch.setattr(engine, "generate_batches",
                        lambda w, jobs, *a: (torch.zeros(len(p), 3, 32, 32, dtype=torch.uint8) for p, _ in jobs))
    monkeypatch.setattr(engine, "_score_group", _oom)
    with pytest.raises(UserError, match=r"out of GPU memory while scoring 4 images .*--batch-size sets generation "
                                        r"batches only"):
        engine.evaluate(cfg)
    assert not (tmp_path / "r").exists()
