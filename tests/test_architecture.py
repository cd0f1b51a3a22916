"""The house rules, enforced: the import table of docs/architecture.md, file sizes, and the package list.

The allowed import edges are read from the table in docs/architecture.md (between the ``import-edges``
markers), so the published rule and the enforced rule cannot drift apart. Each check is also run on a
copy of the source tree with a planted violation, to show that it fails when it should.
"""

from __future__ import annotations

import ast
import re
import shutil
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"lens": "lens", "lens.widgets": "widgets", "lens.kernels": "kernels"}
MAX_LINES = 600


# -- reading the published table ----------------------------------------------------------------------


def edge_table(doc: Path = REPO / "docs" / "architecture.md") -> dict[str, dict]:
    """stage → {"modules": [...], "eager": {stages}, "deferred": {stages}} from the markdown table."""
    text = doc.read_text()
    block = re.search(r"<!-- import-edges.*?-->\n(.*?)<!-- /import-edges -->", text, re.S)
    assert block, "docs/architecture.md has no import-edges table"
    stages: dict[str, dict] = {}
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("stage", "") or set(cells[0]) <= set("-"):
            continue
        name, modules, eager, deferred = cells
        split = lambda cell: {w.strip() for w in cell.split(",") if w.strip()}  # noqa: E731
        stages[name] = {
            "modules": [m.strip("` ") for m in modules.split(",")],
            "eager": split(eager),
            "deferred": split(eager) | split(deferred),
        }
    return stages


def stage_of(module: str, table: dict[str, dict]) -> str | None:
    best, best_len = None, -1
    for stage, row in table.items():
        for prefix in row["modules"]:
            # the bare `lens` row is the package's __init__ only: a new lens.* folder must get its own row
            inside = module.startswith(prefix + ".") and prefix != "lens"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = stage, len(prefix)
    return best


# -- reading the source ---------------------------------------------------------------------------------


def source_modules(repo: Path):
    """(import name, file) of every Python module of the three import packages."""
    for package, folder in ROOTS.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(repo / folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def lens_imports(module: str, path: Path):
    """(imported lens module, deferred?, line) for every import of a lens module in ``path``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, deferred: bool):
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # `from lens import x` imports lens (the api); `from lens.capture import trace` imports
                # lens.capture — the submodule is part of the same stage, so the module is enough.
                found.append((target, inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return [(t, d, n) for t, d, n in found if t == "lens" or t.startswith("lens.")]


def import_violations(repo: Path) -> list[str]:
    table = edge_table(repo / "docs" / "architecture.md")
    problems = []
    for module, path in source_modules(repo):
        stage = stage_of(module, table)
        if stage is None:
            problems.append(f"{module}: belongs to no stage of the import table")
            continue
        for target, deferred, line in lens_imports(module, path):
            target_stage = stage_of(target, table)
            allowed = table[stage]["deferred" if deferred else "eager"]
            if target_stage not in allowed:
                where = "inside a function" if deferred else "at module level"
                problems.append(
                    f"{path.relative_to(repo)}:{line}: {module} ({stage}) imports {target} ({target_stage}) {where}"
                )
    return problems


def oversized_files(repo: Path) -> list[str]:
    big = []
    for folder in ROOTS.values():
        for path in sorted((repo / folder).rglob("*")):
            if path.suffix in (".py", ".js") and path.is_file():
                n = len(path.read_text().splitlines())
                if n > MAX_LINES:
                    big.append(f"{path.relative_to(repo)} has {n} lines (limit {MAX_LINES}): split it by concept")
    return big


def discovered_packages(repo: Path) -> set[str]:
    return {
        module
        for module, path in source_modules(repo)
        if path.name == "__init__.py"
    }


def listed_packages(repo: Path) -> set[str]:
    return set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


# -- the tests --------------------------------------------------------------------------------------------


def test_every_import_follows_the_published_table():
    assert import_violations(REPO) == []


def test_no_source_file_passes_600_lines():
    assert oversized_files(REPO) == []


def test_pyproject_lists_every_package_on_disk():
    assert listed_packages(REPO) == discovered_packages(REPO)


def test_the_table_names_every_stage_it_allows():
    table = edge_table()
    named = set(table)
    for stage, row in table.items():
        assert row["deferred"] <= named, f"{stage} allows unknown stages {row['deferred'] - named}"


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of the source tree and the docs, to plant violations in."""
    for folder in (*ROOTS.values(), "docs"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert import_violations(tmp_path) == [] and oversized_files(tmp_path) == []
    return tmp_path


def test_planted_import_violations_are_found(tree_copy):
    kernel = tree_copy / "kernels" / "attention.py"
    kernel.write_text(kernel.read_text() + "\nfrom lens.capture import trace  # planted: kernels → capture\n")
    families = tree_copy / "lens" / "models" / "families.py"
    families.write_text(
        families.read_text() + "\n\ndef _planted():\n    from lens.analysis import sinks  # planted: models → analysis\n"
    )
    probes = tree_copy / "lens" / "capture" / "probes.py"
    probes.write_text(probes.read_text() + "\nimport lens.widgets  # planted: the core imports a view\n")
    problems = import_violations(tree_copy)
    assert len(problems) == 3, problems
    assert any("lens.kernels.attention (kernels) imports lens.capture" in p for p in problems)
    assert any("lens.models.families (models) imports lens.analysis" in p and "inside a function" in p for p in problems)
    assert any("lens.capture.probes (capture) imports lens.widgets" in p for p in problems)


def test_a_deferred_view_import_is_allowed_only_inside_a_function(tree_copy):
    valley = tree_copy / "lens" / "analysis" / "valley.py"
    valley.write_text(valley.read_text() + "\nfrom lens.widgets import ValleyPlot  # planted at module level\n")
    problems = import_violations(tree_copy)
    assert len(problems) == 1 and "at module level" in problems[0], problems


def test_planted_oversized_file_and_unlisted_package_are_found(tree_copy):
    (tree_copy / "widgets" / "static" / "huge.js").write_text("// x\n" * (MAX_LINES + 1))
    assert len(oversized_files(tree_copy)) == 1
    new = tree_copy / "lens" / "newstage"
    new.mkdir()
    (new / "__init__.py").write_text('"""planted"""\n')
    assert discovered_packages(tree_copy) - listed_packages(tree_copy) == {"lens.newstage"}
    assert any("lens.newstage" in p for p in import_violations(tree_copy))  # and it belongs to no stage
