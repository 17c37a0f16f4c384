"""Metrics as a registry (issue 15, item 4): one hashed record per metric (caption spec + the fields it reads + its
settings), the comparability rule check, table and the comparison share, unknown names as one-line errors."""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app
from rapm_bench.errors import UserError
from rapm_bench.eval import metrics as M
from rapm_bench.eval.protocols import PROTOCOLS, get_protocol
from rapm_bench.report.results import comparable_metrics, metric_hashes

ROOT = Path(__file__).resolve().parents[1]

# Changing a shipped metric's fields or settings (or a protocol) changes these: update them on purpose only.
PINNED = {
    "coco30k": {"fid": "6d454bd596ac", "kid": "d26518842c09", "clip_score": "ee0abeec9e6e",
                "retrieval_accuracy": "452c70ff77d3"},
    "dmd2-coco10k": {"fid": "97933834655f", "kid": "dd13e00e0da4", "clip_score": "ed0087ba545d",
                     "retrieval_accuracy": "bf1608ed21ad"},
    "tiny": {"fid": "f16f13d6d4bd", "kid": "a6d9eea39b93", "clip_score": "cba9ddec2aca",
             "retrieval_accuracy": "a0ac9736f2f7"},
}

# A metric of the test's own (the toy plug-in of test_plugins_e2e.py, reduced): it reads no protocol field.
TOY = M.MetricSpec("toy", "toy", M.Detector("toy", lambda s, images, c: images.double().mean((1, 2, 3)),
                                            lambda s: 0), "lower", (), lambda ctx: {"toy": ctx.mean("toy")})


def hashes(protocol) -> dict[str, str]:
    return {name: protocol.metric_hash(spec) for name, spec in M.metrics().items()}


def test_shipped_metric_hashes_are_pinned():
    """(The protocol hashes themselves stay as tests/test_protocols.py pins them.)"""
    assert list(M.metrics()) == ["fid", "kid", "clip_score", "retrieval_accuracy"]
    assert {name: hashes(p) for name, p in PROTOCOLS.items()} == PINNED


@pytest.mark.parametrize(("field", "value", "moved"), [
    ("fid_mode", "none", {"fid", "kid"}),  # read by FID and KID only (one detector, one reference)
    ("fid_weights_sha256", "ab" * 32, {"fid", "kid"}),
    ("clip_prefix", "A photo of ", {"clip_score"}),  # the retriever ranks the raw captions
    ("clip_model", "ViT-B-32", {"clip_score", "retrieval_accuracy"}),
    ("feature_precision", "bf16", {"fid", "kid", "clip_score", "retrieval_accuracy"}),
    ("caption_seed", 7, {"fid", "kid", "clip_score", "retrieval_accuracy"}),  # the caption spec: every metric
    ("name", "coco30k-renamed", set()),  # a label, not a definition
])
def test_a_field_moves_the_hashes_of_the_metrics_that_read_it(field, value, moved):
    base = get_protocol("coco30k")
    changed = dataclasses.replace(base, **{field: value})
    assert changed.hash() != base.hash()
    before, after = hashes(base), hashes(changed)
    assert {m for m in before if before[m] != after[m]} == moved


def test_settings_are_hashed_and_a_new_metric_leaves_the_others_alone():
    p = get_protocol("tiny")
    kid = M.get_metric("kid")
    assert p.metric_hash(dataclasses.replace(kid, settings={**kid.settings, "subsets": 50})) != PINNED["tiny"]["kid"]
    M.register_metric(TOY)
    try:
        assert list(M.metrics())[-1] == "toy" and {k: v for k, v in hashes(p).items() if k != "toy"} == PINNED["tiny"]
    finally:
        M.unregister_metric("toy")
    assert "toy" not in M.metrics()


def test_unknown_or_malformed_metrics_are_refused():
    with pytest.raises(UserError, match=r"^unknown metric 'fdi'; known: fid, kid, clip_score, retrieval_accuracy$"):
        M.get_metric("fdi")
    with pytest.raises(ValueError, match="reads unknown protocol fields clip_temperature"):
        M.register_metric(dataclasses.replace(TOY, fields=("clip_temperature",)))
    with pytest.raises(ValueError, match="better must be one of lower, higher"):
        M.register_metric(dataclasses.replace(TOY, better="up"))
    with pytest.raises(ValueError, match="declares another detector named 'fid-features'"):
        M.detectors([M.get_metric("fid"), dataclasses.replace(TOY, detector=dataclasses.replace(
            M.FID_FEATURES, dim=lambda s: 3))])
    assert "toy" not in M.metrics()


def test_entry_point_metrics_load_beside_the_shipped_ones(monkeypatch):
    """A plug-in package's `rapm_bench.metrics` entry point (here one naming this module's TOY) joins the registry."""
    from rapm_bench import plugins

    eps = (EntryPoint("toy", f"{__name__}:TOY", plugins.METRICS_GROUP),)
    monkeypatch.setattr(plugins, "plugin_entry_points", lambda group: eps if group == plugins.METRICS_GROUP else ())
    M.installed_metrics.cache_clear()
    try:
        assert list(M.metrics()) == ["fid", "kid", "clip_score", "retrieval_accuracy", "toy"]
        assert M.get_metric("toy").value({"toy": 0.5}) == 0.5
    finally:
        monkeypatch.undo()
        M.installed_metrics.cache_clear()
    assert "toy" not in M.metrics() and plugins.METRICS_GROUP not in plugins.DECLARED


# --- comparability ------------------------------------------------------------------------------------------------
def committed(name: str = "rapm-4step-tiny.json") -> dict:
    return json.loads((ROOT / "results" / "tiny" / "ci" / name).read_text())


def test_results_before_metric_hashes_derive_them_from_the_shipped_protocol():
    old = committed()  # made before metric hashes and before KID: hashes for the metrics it holds
    held = {k: v for k, v in PINNED["tiny"].items() if k != "kid"}
    assert "metric_hashes" not in old and "kid" not in old and metric_hashes(old) == held
    assert comparable_metrics(old, old) == dict.fromkeys(held, True)
    unknown = old | {"protocol_hash": "0123456789ab"}  # a protocol definition this code does not ship
    assert metric_hashes(unknown) is None
    assert comparable_metrics(unknown, unknown) == dict.fromkeys(held, True)  # identical protocol_hash
    assert not any(comparable_metrics(old, unknown).values())
    new = old | {"kid": {"mean": 0.01, "std": 0.001}, "metric_hashes": PINNED["tiny"]}
    assert comparable_metrics(old, new) == dict.fromkeys(held, True)  # KID: only one of them holds it


def test_check_compares_only_the_metrics_whose_definition_agrees(tmp_path):
    """A result whose FID/KID record differs (another FID network, say) is still checked on CLIP and retrieval,
    with a note for FID and KID; a result comparable on nothing is the one-line protocol error."""
    base = committed()
    other_fid = base | {"protocol_hash": "0123456789ab",
                        "metric_hashes": PINNED["tiny"] | {"fid": "f" * 12, "kid": "e" * 12}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / "rapm-4step-tiny.json").write_text(json.dumps(other_fid))
    r = CliRunner().invoke(app, ["check", "--baseline", str(tmp_path / "base.json"), "--results", str(tmp_path / "cur")])
    assert r.exit_code == 0, r.output
    assert "| rapm 4-step | clip_score |" in r.output and "| rapm 4-step | retrieval_accuracy |" in r.output
    assert "| fid |" not in r.output and "| kid |" not in r.output
    assert "note: FID not compared for rapm 4-step: its definition differs" in r.output
    nothing = other_fid | {"metric_hashes": {k: "0" * 12 for k in PINNED["tiny"]}}
    (tmp_path / "cur" / "rapm-4step-tiny.json").write_text(json.dumps(nothing))
    r = CliRunner().invoke(app, ["check", "--baseline", str(tmp_path / "base.json"), "--results", str(tmp_path / "cur")])
    assert r.exit_code == 2 and "not comparable" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "needle"), [
    (["--tol", "fdi=1"], "unknown metric 'fdi'"),
    (["--tol", "fid"], "--tol 'fid': expected METRIC=VALUE"),
    (["--tol", "fid=x"], "--tol 'fid=x': expected METRIC=VALUE"),
    (["--tol", "kid=-1"], "tolerances must be non-negative, got kid=-1"),
    (["--tol", "fid=0.2", "--fid-tol", "0.3"], "--tol fid=0.2 disagrees with its alias (0.3)"),
])
def test_tolerance_errors_are_one_line(tmp_path, args, needle):
    (tmp_path / "base.json").write_text(json.dumps(committed()))
    r = CliRunner().invoke(app, ["check", "--baseline", str(tmp_path / "base.json"), "--results",
                                 str(tmp_path / "base.json"), *args])
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_tol_and_its_aliases_set_the_same_tolerances(tmp_path):
    """`--tol fid=X` = `--fid-tol X`; `--clip-tol X` also sets retrieval accuracy's to X/100, as before."""
    base = committed()
    moved = base | {"fid": base["fid"] + 0.3, "clip_score": base["clip_score"] + 0.2,
                    "retrieval_accuracy": base["retrieval_accuracy"] - 0.004}
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / "rapm-4step-tiny.json").write_text(json.dumps(moved))

    def run(*args: str) -> str:
        r = CliRunner().invoke(app, ["check", "--baseline", str(tmp_path / "base.json"), "--results",
                                     str(tmp_path / "cur"), *args])
        assert r.exit_code in (0, 1), r.output
        return r.output

    assert run() == run("--tol", "fid=0.5", "--tol", "clip_score=0.5", "--tol", "kid=0.005")
    assert run("--fid-tol", "0.2") == run("--tol", "fid=0.2") and "| fid |" in run("--tol", "fid=0.2")
    assert "DRIFT" in run("--tol", "fid=0.2") and "DRIFT" not in run()
    assert "| 0.003 | DRIFT |" in run("--clip-tol", "0.3")  # retrieval: 0.3 / 100
    assert run("--clip-tol", "0.3") == run("--tol", "clip_score=0.3", "--tol", "retrieval_accuracy=0.003")


# --- the committed outputs regenerate as they were; a plug-in metric adds its column where a result holds it ------
@pytest.mark.parametrize("folder", ["tiny", "tiny/sweep"])
def test_committed_tables_and_comparisons_regenerate_byte_identically(tmp_path, folder):
    from rapm_bench.report.comparison import markdown
    from rapm_bench.report.table import write_table

    src = ROOT / "results" / folder
    write_table([src], tmp_path, "tiny")
    for name in ("table.md", "table.csv", "table.tex"):
        assert (tmp_path / name).read_bytes() == (src / name).read_bytes(), name
    record = json.loads((src / "comparison.json").read_text())
    assert markdown(record) == (src / "comparison.md").read_text()
    M.register_metric(TOY)  # registered, but held by no result: no column anywhere
    try:
        write_table([src], tmp_path / "with-toy", "tiny")
        assert (tmp_path / "with-toy" / "table.md").read_bytes() == (src / "table.md").read_bytes()
        assert markdown(record) == (src / "comparison.md").read_text()
    finally:
        M.unregister_metric("toy")


def test_a_plug_in_metric_a_comparison_holds_gets_a_column_and_a_verdict():
    from rapm_bench.report import comparison

    record = json.loads((ROOT / "results" / "tiny" / "comparison.json").read_text())
    for group in record["by_steps"].values():
        for m in group["methods"].values():  # what collect() records for a metric the runs' results hold
            m["toy"] = {"mean": 0.25, "sd": None}
            for run in m["runs"]:
                run["toy"] = 0.25
    M.register_metric(TOY)
    try:
        assert comparison.tested() == ("fid", "kid", "toy")  # lower is better: tested like FID and KID
        md = comparison.markdown(record)
    finally:
        M.unregister_metric("toy")
    assert "| method | seeds | FID ↓ | KID×10³ ↓ | CLIP ↑ | retrieval ↑ | toy ↓ | s / iteration |" in md
    assert "| rapm | 1 | 15.13 | 172.05 | 72.06 | 0.838 | 0.25 | 0.23 |" in md
    assert "| teacher, 1 step, CFG 3 | – | 57.30 | 1209.75 | 43.99 | 0.430 | – | – |" in md
    assert "on FID, KID and toy per pair of methods" in md and "| steps | FID ↓ | KID×10³ ↓ | CLIP ↑ | toy ↓ |" in md


def test_a_plug_in_detector_leaves_the_shared_resamples_as_they_are():
    """The bootstrap draw is sized by FID's features, not by the widest rows: a plug-in's 4096-d detector does not
    cut tiny's 1000 resamples to coco's 100 (every other interval would move)."""
    import torch

    from rapm_bench.eval.metrics import Accumulator

    def finish(rows: dict) -> M.Finish:
        return M.Finish(get_protocol("tiny"), 5000, Accumulator({}, rows, {}, {}), {}, torch.device("cpu"))

    def wide(dim: int) -> torch.Tensor:
        return torch.zeros(5000, 1).expand(-1, dim)  # (5000, dim) rows without the memory

    assert finish({"fid-features": wide(128)}).resamples == 1000
    assert finish({"fid-features": wide(128), "wide": wide(4096)}).resamples == 1000
    assert finish({"fid-features": wide(2048)}).resamples == 100  # 5000·2048·2048 > 1e10: each resample costs
