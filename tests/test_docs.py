"""The project's own documentation: the MkDocs site builds in strict mode, every public module has an API
page, every ``docs/…md#section`` cited anywhere exists, and every Python code block of README.md and docs/
runs, in order, as a reader would paste it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PACKAGE_DIRS = {"lens": ROOT / "lens", "lens.kernels": ROOT / "kernels", "lens.widgets": ROOT / "widgets"}


def test_docs_site_builds_in_strict_mode(tmp_path):
    """``mkdocs build --strict``: a broken link, anchor, cross-reference or API path fails the build."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"),
                          "-d", str(site)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    definitions = (site / "definitions" / "index.html").read_text()
    assert "Sink rate" in definitions and "Gu et al." in definitions
    api = (site / "api" / "analysis" / "index.html").read_text()
    # the API pages are built from the docstrings: the valley's own text is there
    assert "no interior valley" in api and "ValleyResult" in api
    assert (site / "api" / "kernels" / "index.html").read_text().count("NVFP4") > 3  # lens.kernels is mapped
    assert not (site / "mkdocs.yml").exists() and not (site / "mkdocs_hooks.py").exists()
    assert "fonts.googleapis" not in (site / "index.html").read_text()  # the site fetches nothing from elsewhere


def _public_modules() -> list[str]:
    modules = []
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith("_") for p in parts):  # private modules and __main__
                continue
            name = ".".join([package, *parts])
            if package == "lens" and parts[:1] in (["kernels"], ["widgets"]):
                continue
            modules.append(name)
    return sorted(set(modules))


def test_every_public_module_has_an_api_page():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented.update(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    missing = [m for m in _public_modules() if m not in documented]
    assert not missing, (
        f"no API page documents {missing}: add a '::: <module>' line to its stage's page in docs/api/ "
        "(a new stage: a new page and a line in docs/mkdocs.yml's nav; see docs/architecture.md)"
    )


def _anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    anchors = set()
    for line in page.read_text().splitlines():
        match = re.match(r"^#{1,6} (.+?)\s*$", line)
        if match:
            anchors.add(slugify(match.group(1), "-"))
    return anchors


def _repository_files():
    for path in ROOT.rglob("*"):
        if any(part in (".venv", ".git", "site", "__pycache__", "build", "dist") or part.endswith(".egg-info")
               for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and path.suffix in (".py", ".md", ".ipynb", ".js", ".toml", ".yml", ".txt"):
            yield path


def test_citations_of_the_docs_point_at_pages_and_sections_that_exist():
    """Docstrings cite ``docs/definitions.md#sink-rate``: the page and the section must exist. Nothing cites
    a file outside the repository (the design notes the project started from)."""
    broken, outside = [], []
    for path in _repository_files():
        text = path.read_text(errors="replace")
        for page, anchor in re.findall(r"docs/([\w/.-]+?\.md)(?:#([\w-]+))?", text):
            target = DOCS / page
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path.relative_to(ROOT)}: docs/{page}{'#' + anchor if anchor else ''}")
        if path.name != "test_docs.py" and re.search(r"DESIGN(\.md)? §|DESIGN\.md", text):
            outside.append(str(path.relative_to(ROOT)))
    assert not broken, broken
    assert not outside, f"cite docs/definitions.md instead of the design notes: {outside}"


# -- code blocks ------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)


def code_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, source) of each ```python block, in order; ```python no-run blocks are left out."""
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        info = match.group(1).split()
        if info[:1] == ["python"] and "no-run" not in info:
            blocks.append((text[: match.start()].count("\n") + 1, match.group(2)))
    return blocks


PAGES = [p for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))] if code_blocks(p)]


def test_code_block_extraction_finds_the_blocks():
    assert any(p.name == "README.md" for p in PAGES) and any(p.name == "deployment.md" for p in PAGES)
    assert all(ast.parse(source) for page in PAGES for _, source in code_blocks(page))


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run_in_order(page, tmp_path, monkeypatch):
    """Each page's blocks run top to bottom in one namespace, in a fresh working folder, as pasted."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for line, source in code_blocks(page):
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
