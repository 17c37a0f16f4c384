"""`rapm-bench report`: the self-contained HTML page of a results folder (issue 16, part 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rapm_bench.cli import app

TINY = Path(__file__).resolve().parents[1] / "results" / "tiny"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def md_rows(table_md: Path) -> list[list[str]]:
    """The body rows of a GitHub Markdown table, as cell texts."""
    lines = [ln for ln in table_md.read_text().splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


class Cells(HTMLParser):
    """Rows of `<table id="results">` as lists of cell texts; also counts tags that would fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.row_classes: list[str] = []
        self.in_table = False
        self.cell: list[str] | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and not str(a[key]).startswith(("data:", "#")):
                self.external.append(f"{tag} {key}={a[key]}")
        if tag == "script":
            self.external.append("script")
        if tag == "table" and a.get("id") == "results":
            self.in_table = True
        elif self.in_table and tag == "tr":
            self.rows.append([])
            self.row_classes.append(a.get("class") or "")
        elif self.in_table and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_table = False
        elif self.in_table and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def parse(html: str) -> Cells:
    p = Cells()
    p.feed(html)
    return p


def assert_holds_every_row(cells: Cells, table_md: Path) -> None:
    """Every row of table.md is a row of the page (each cell's text starts with the Markdown cell)."""
    page = [r for r, cls in zip(cells.rows, cells.row_classes, strict=True) if cls in ("measured", "reported")]
    want = md_rows(table_md)
    assert want and len(page) == len(want)
    for row in want:
        assert any(all(got.startswith(cell) for got, cell in zip(p, row, strict=False)) and len(p) >= len(row)
                   for p in page), f"row {row} missing from the page"


@pytest.fixture()
def tiny_results(tmp_path: Path) -> Path:
    """A copy of the committed results/tiny (the test writes report.html into it)."""
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    return folder


@pytest.mark.e2e
def test_report_holds_every_table_row_images_and_provenance(tiny_results):
    """No browser needed: the page holds every table.md row, each PNG inlined, a provenance row per result."""
    r = CliRunner().invoke(app, ["report", str(tiny_results)])
    assert r.exit_code == 0, r.output
    page = tiny_results / "report.html"
    html = page.read_text()
    cells = parse(html)
    assert_holds_every_row(cells, tiny_results / "table.md")
    assert not cells.external, f"the page fetches something: {cells.external[:3]}"
    for png in sorted(tiny_results.glob("*.png")):
        assert f'alt="{png.name}"' in html
    assert html.count("data:image/png;base64,") == len(list(tiny_results.glob("*.png")))
    results = [json.loads(p.read_text()) for p in tiny_results.glob("*-tiny.json")]
    assert html.count("<details>\n          <summary>provenance") == len(results)
    for rec in results:
        assert rec["git_commit"] in html and rec["protocol_hash"] in html and rec["created"] in html
    assert "Equal-budget comparison" in html and "<table>" in html  # comparison.md rendered, its table too


@pytest.mark.e2e
def test_report_shows_intervals_kid_and_marks_reported_rows(tmp_path):
    """Interval and KID fields show when present (not required); the papers' rows are marked as reported."""
    folder = tmp_path / "r"
    folder.mkdir()
    rec = json.loads((TINY / "rapm-4step-tiny.json").read_text())
    with_ci = rec | {"fid_ci": [2.875, 3.125], "clip_score_ci": [91.5, 91.9], "retrieval_accuracy_ci": [0.99, 0.998],
                     "kid": {"mean": 0.0012, "std": 0.0003, "subsets": 100}}
    (folder / "rapm-4step-tiny.json").write_text(json.dumps(with_ci))
    (folder / "rapm-4step-sdxl.json").write_text(json.dumps(rec | {"preset": "sdxl"}))  # sdxl: reported rows too
    out = tmp_path / "page.html"
    r = CliRunner().invoke(app, ["report", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "[2.88, 3.12]" in html and "[91.50, 91.90]" in html and "[0.990, 0.998]" in html
    assert "0.0012 ± 0.0003" in html
    cells = parse(html)
    assert "reported" in cells.row_classes and "measured" in cells.row_classes
    reported = [r for r, c in zip(cells.rows, cells.row_classes, strict=True) if c == "reported"]
    assert reported and all(row[0].startswith("reportedreported: ") for row in reported)  # badge, then source


@pytest.mark.e2e
def test_report_of_a_folder_without_results_is_one_line(tmp_path):
    """No result JSONs: exit 2, one line, nothing written."""
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no result JSONs" in r.output and len(r.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no results folder" in r.output


def browser() -> str | None:
    """A Chromium-family browser on PATH."""
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.mark.e2e
def test_report_in_headless_chromium(tiny_results, tmp_path):
    """Chromium renders the page: its DOM holds every table.md row, and its screenshot is not blank."""
    exe = browser()
    if exe is None:
        pytest.skip("no Chromium on PATH: install it with `apt-get install chromium` (Debian/Ubuntu) to run this test")
    from PIL import Image

    from rapm_bench.report.html import write_report

    page = write_report(tiny_results)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert_holds_every_row(parse(dom.stdout), tiny_results / "table.md")
    shot = tmp_path / "shot.png"
    run = subprocess.run([exe, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, "the screenshot is blank"
