"""MkDocs hooks of the lens docs site (docs/mkdocs.yml).

1. The pages live in docs/, beside the config. MkDocs will not accept the config's own folder as
   ``docs_dir`` (it would publish the config); lens keeps its pages at ``docs/*.md`` because docstrings and
   the README cite them there. mkdocs.yml therefore names a sub-folder, and :func:`on_config` points
   ``docs_dir`` back at the config's folder; ``exclude_docs`` keeps the config and this file out of the site.
2. The sources for the API pages. The distribution maps import names to folders (``lens.kernels`` →
   ``kernels/``, ``lens.widgets`` → ``widgets/``, pyproject's ``package-dir``), which griffe — reading the
   sources without importing them — cannot follow. :func:`on_config` lays out the import tree as symbolic
   links in a temporary folder and puts it first on the search path (:func:`on_startup`), so every API page
   is read from the repository's own files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path


def _import_tree(root: Path) -> Path:
    """A folder holding ``lens/`` as the import system sees it: real folders, each source file a symbolic
    link into ``root`` (griffe does not descend into linked folders)."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = Path(tempfile.gettempdir()) / f"lens-docs-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"
    shutil.rmtree(tree, ignore_errors=True)
    mapped = {root / folder for folder in mapping.values()}
    for name, folder in mapping.items():
        source = root / folder
        for path in source.rglob("*.py"):
            relative = path.relative_to(source)
            # a file inside another mapped folder (lens/ does not hold kernels/, but be safe) belongs to that one
            if any(p in mapped and p != source for p in path.parents):
                continue
            target = tree.joinpath(*name.split("."), relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return tree


def on_startup(command, dirty):
    # before any plugin's on_config: mkdocstrings' handler takes its search path from sys.path then
    tree = str(_import_tree(Path(__file__).resolve().parent.parent))
    if tree not in sys.path:
        sys.path.insert(0, tree)


def on_config(config):
    docs = os.path.dirname(os.path.abspath(config.config_file_path))
    config.docs_dir = docs
    site = os.path.abspath(config.site_dir)
    if (site + os.sep).startswith(docs + os.sep):
        raise ValueError(f"site_dir {site} is inside the docs folder {docs}; build elsewhere (-d)")
    return config
