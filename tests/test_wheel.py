"""The built wheel works on its own: every package is in it, the CLI runs, and a trace runs from it.

Both README commands install lens in editable mode, which would hide a package missing from the wheel. This
test builds the wheel, installs it (without the source tree on the path) into a fresh virtualenv whose
dependencies come from the test environment, and uses it from an empty folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the test environment's setuptools instead of downloading one
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root, REPO], cwd=root)
    (wheel,) = root.glob("lens_interp-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    # the dependencies (torch, transformers, …) come from the test environment; a plain path entry in a .pth
    # file does not run that environment's own .pth files, so its editable lens stays out of sight
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"root": root, "wheel": wheel, "python": python, "bin": venv / "bin", "site": site, "env": env}


def test_wheel_contains_every_package_and_the_widget_assets(wheel_env):
    names = zipfile.ZipFile(wheel_env["wheel"]).namelist()
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} is missing from the wheel"
    assert any(n.startswith("lens/widgets/static/") and n.endswith(".js") for n in names)
    assert not any(n.startswith(("widgets/", "kernels/", "tests/")) for n in names), "top-level names leaked"


def test_installed_wheel_imports_every_module_from_site_packages(wheel_env):
    code = (
        "import importlib, pkgutil, lens, lens.kernels, lens.widgets\n"
        "assert lens.__file__.startswith(%r), lens.__file__\n"
        "mods = [m.name for p in (lens,) for m in pkgutil.walk_packages(p.__path__, 'lens.')]\n"
        "skip = ('lens.__main__',)\n"
        "for name in mods:\n"
        "    if name not in skip: importlib.import_module(name)\n"
        "print(len(mods))\n"
    ) % str(wheel_env["site"])
    count = int(_run([wheel_env["python"], "-c", code], cwd=wheel_env["root"], env=wheel_env["env"]).strip())
    assert count > 30


def test_installed_wheel_runs_the_cli_and_a_trace(wheel_env, tiny_model_dir):
    tiny_gpt2 = tiny_model_dir("gpt2")
    help_text = _run([wheel_env["bin"] / "lens", "demo", "--help"], cwd=wheel_env["root"], env=wheel_env["env"])
    assert "report" in help_text
    module_help = _run([wheel_env["python"], "-m", "lens", "demo", "--help"], cwd=wheel_env["root"], env=wheel_env["env"])
    assert module_help == help_text
    code = (
        "import lens\n"
        f"lm = lens.load({str(tiny_gpt2)!r})\n"
        "run = lens.trace(lm, ['The cat sat on the mat.'], progress=False)\n"
        "print(lens.sinks(run).sink_rate.shape[0])\n"
    )
    out = _run([wheel_env["python"], "-c", code], cwd=wheel_env["root"], env=wheel_env["env"])
    assert out.strip().splitlines()[-1] == "2"
