"""The import contract, read from the source with `ast` (module-level and function-level imports alike):
imports run one way, `baselines/` → `rapm_bench`, the stage packages do not import each other in a circle, and no
files do."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rapm_bench"
STAGES = ("rapm_bench.eval", "rapm_bench.distill", "rapm_bench.report", "rapm_bench.tiny", "rapm_bench.worlds")

# The stage packages' imports of each other today (importer → imported). A new edge fails the test: check it
# closes no circle (test_no_cycle_between_stage_packages) and add it here.
ALLOWED_EDGES = {
    ("rapm_bench.distill", "rapm_bench.eval"),  # ablation and engine: evaluate
    ("rapm_bench.distill", "rapm_bench.report"),  # ablation: welch
    ("rapm_bench.distill", "rapm_bench.tiny"),  # ablation: save_grid_png
    ("rapm_bench.distill", "rapm_bench.worlds"),
    ("rapm_bench.eval", "rapm_bench.worlds"),
    ("rapm_bench.report", "rapm_bench.eval"),
    ("rapm_bench.report", "rapm_bench.worlds"),
    ("rapm_bench.tiny", "rapm_bench.eval"),  # training the tiny evaluator, the world report's FID
    ("rapm_bench.tiny", "rapm_bench.worlds"),  # the adapter and the shapes it trains the teacher on
}
# The worlds (adapters and their registry) import no other stage: the tiny world's training and report tooling,
# which needs the evaluation, lives beside its assets in rapm_bench/tiny/ (issue 15, item 2).


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth; `from M import n` yields
    M and M.n (n may be a submodule); relative imports are resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return found


def all_imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) over every module of rapm_bench."""
    return [(module_name(p), target, line) for p in sorted(PACKAGE.rglob("*.py")) for target, line in imports(p)]


def stage(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def stage_edges() -> dict[tuple[str, str], list[str]]:
    """Package-level graph of the stage packages: (importer, imported) → the import sites."""
    edges: dict[tuple[str, str], list[str]] = {}
    for src, target, line in all_imports():
        a, b = stage(src), stage(target)
        if a and b and a != b:
            edges.setdefault((a, b), []).append(f"{src}:{line} imports {target}")
    return edges


def find_cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """A circle in the directed graph, as a path [a, b, ..., a], or None."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_function_level_and_relative_imports():
    """The walk finds the imports inside function bodies and resolves `..` (else the checks below prove nothing)."""
    found = {(src, target) for src, target, _ in all_imports()}
    assert ("rapm_bench.eval.metrics", "rapm_bench.eval.reference") in found  # inside _fid_reference()
    assert ("rapm_bench.distill.engine", "rapm_bench.files.atomic_write_bytes") in found  # `from ..files import`
    assert ("rapm_bench.eval.engine", "rapm_bench.worlds") in found  # `from ..worlds import` at module level


def test_rapm_bench_never_imports_baselines():
    """Imports run one way: baselines/ → rapm_bench; the package finds published models and objectives as
    plug-ins (rapm_bench/plugins.py)."""
    reverse = [f"{src}:{line} imports {target}" for src, target, line in all_imports()
               if target == "baselines" or target.startswith("baselines.")]
    assert not reverse, "rapm_bench imports baselines (register a plug-in instead):\n" + "\n".join(reverse)


def test_no_new_edge_between_stage_packages():
    new = {edge: sites for edge, sites in stage_edges().items() if edge not in ALLOWED_EDGES}
    assert not new, "new imports between stage packages (see ALLOWED_EDGES):\n" + "\n".join(
        f"{a} → {b}: {sites[0]}" for (a, b), sites in sorted(new.items()))


def test_no_cycle_between_stage_packages():
    """No circle among eval, distill, report, tiny, worlds."""
    edges = stage_edges()
    cycle = find_cycle(set(edges))
    assert cycle is None, "import circle between stage packages: " + " → ".join(cycle) + "\n" + "\n".join(
        edges[(a, b)][0] for a, b in zip(cycle, cycle[1:], strict=False))


def module_edges() -> dict[tuple[str, str], str]:
    """The file-level graph: (importer, imported module) → the first import site, every import statement counted
    (module level, inside functions, under TYPE_CHECKING); `from M import n` points at M.n where n is a module."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    edges: dict[tuple[str, str], str] = {}
    for src, target, line in all_imports():
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != src:
            edges.setdefault((src, target), f"{src}:{line} imports {target}")
    return edges


def test_no_import_circle_between_files():
    """No two files of rapm_bench import each other, directly or around a loop, at any depth: the registries'
    hooks that reach up the pipeline (worlds' bench and reproduce hooks, RAPM's builder) are found through entry
    points (rapm_bench/plugins.py), never imported from below."""
    edges = module_edges()
    assert ("rapm_bench.eval.engine", "rapm_bench.eval.metrics") in edges  # the walk sees the file graph
    cycle = find_cycle(set(edges))
    assert cycle is None, "import circle between files: " + " → ".join(cycle) + "\n" + "\n".join(
        edges[(a, b)] for a, b in zip(cycle, cycle[1:], strict=False))


def test_every_from_import_resolves():
    """Each `from rapm_bench... import name` of the package and baselines/, in functions too, names something the
    module has: a name moved to another module leaves no lazy import behind that fails only when it runs."""
    import importlib
    import importlib.util

    missing = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "baselines").rglob("*.py")]):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            parts = package.split(".")
            base = (".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level else node.module or "")
            if base.split(".")[0] not in ("rapm_bench", "baselines"):
                continue
            module = importlib.import_module(base)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{base}.{alias.name}") is None:
                    missing.append(f"{name}:{node.lineno} imports {alias.name} from {base}, which has none")
    assert not missing, "\n".join(missing)


def test_worlds_import_no_other_stage():
    """The adapters and the world registry name the other stages' pieces only by hooks that import nothing
    from eval, distill, report or tiny (their lazy imports reach bench and reproduce, outside the stages)."""
    out = {edge: sites for edge, sites in stage_edges().items() if edge[0] == "rapm_bench.worlds"}
    assert not out, "\n".join(sites[0] for sites in out.values())


# The performance package is a leaf: it may import anything in rapm_bench, and only the command line and the
# old module paths it replaced (bench.py, scaling.py: re-exports) import it.
PERF_IMPORTERS = {"rapm_bench.cli", "rapm_bench.bench", "rapm_bench.scaling"}


def test_only_the_cli_and_the_compatibility_modules_import_perf():
    out = [f"{src}:{line} imports {target}" for src, target, line in all_imports()
           if (target == "rapm_bench.perf" or target.startswith("rapm_bench.perf."))
           and not (src == "rapm_bench.perf" or src.startswith("rapm_bench.perf.")) and src not in PERF_IMPORTERS]
    assert not out, "\n".join(out)


def test_find_cycle_reports_the_circle():
    assert find_cycle({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == ["a", "b", "c", "a"]
    assert find_cycle({("a", "b"), ("b", "c"), ("a", "c")}) is None


def test_declared_plugins_equal_pyproject():
    """rapm_bench.plugins.DECLARED (the fallback of an install without the entry points) is pyproject.toml's."""
    from rapm_bench import plugins

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {g: declared.get(g) for g in plugins.DECLARED} == plugins.DECLARED

