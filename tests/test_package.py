"""Packaging rules: the direction of imports, a light `import lens`, ranges not pins, Binder files."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions: those are deliberate lazy imports)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add("." * node.level + node.module)
        elif isinstance(node, (ast.If, ast.Try)):
            for child in ast.walk(node):
                if isinstance(child, ast.Import):
                    names.update(alias.name for alias in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module:
                    names.add(child.module)
    return names


def test_kernels_import_nothing_from_lens():
    for path in (ROOT / "kernels").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # not even lazily
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lens":
                raise AssertionError(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "lens" for a in node.names), path.name


def test_core_never_imports_views_or_ui_at_import_time():
    ui = ("lens.widgets", "anywidget", "ipywidgets", "panel", "plotly", "bokeh", "IPython")
    for path in (ROOT / "lens").rglob("*.py"):
        if path.name == "figures.py":  # imported only inside .figure() methods
            continue
        for name in _top_level_imports(path):
            assert not name.startswith(ui), f"{path.relative_to(ROOT)} imports {name} at module level"


def test_import_lens_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import lens; "
        "heavy = [m for m in ('plotly', 'panel', 'anywidget', 'ipywidgets', 'pandas', 'transformers.modeling_utils', "
        "'lens.widgets') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_dependencies_are_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert "==" not in requirement, requirement
    assert "torch>=2.13" in project["dependencies"]  # the lowest torch the suite runs on
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert package_dir == {"lens": "lens", "lens.widgets": "widgets", "lens.kernels": "kernels"}


def test_binder_installs_lens_and_cpu_torch():
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in requirements and "torch" in requirements
    post = ROOT / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111, "postBuild must be executable"
    assert "pip install" in post.read_text() and '-e ".[' in post.read_text()


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```\n")[1::2]][:2]
    assert "lens demo" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run runs the README's own command


def test_old_module_paths_still_work_with_a_deprecation_warning():
    code = (
        "import warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import lens\n"
        "from lens.models import load as new\n"
        "try:\n"
        "    import lens.model\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import lens.model, lens.tracer, lens.families, lens.kernels.lowbit_formats\n"
        "from lens.tracer import trace\n"
        "from lens.report import Report\n"
        "import lens.capture.trace, lens.models.families, lens.kernels.lowbit\n"
        "assert lens.model is new and lens.model.load is lens.models.load.load\n"
        "assert trace is lens.capture.trace.trace and lens.tracer is lens.capture.trace\n"
        "assert lens.families.register_family is lens.models.families.register_family\n"
        "assert lens.kernels.lowbit_formats.NVFP4Codec is lens.kernels.lowbit.NVFP4Codec\n"
        "assert lens.capture.trace.__spec__.name == 'lens.capture.trace'  # the real module keeps its own name\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: lens.model moved to lens.models.load" in out and out.strip().endswith("ok"), out


def test_tab_completion_offers_the_lazy_names():
    import lens

    for name in lens.__all__:
        assert name in dir(lens), name
    # IPython's own completer (dir() of the live module) and jedi's, which JupyterLab's kernel uses by default
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "import jedi\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('import lens')\n"
        "shell.Completer.use_jedi = False\n"
        "print(shell.complete('lens.lo')[1])\n"
        "print([c.name for c in jedi.Interpreter('lens.tra', [shell.user_ns]).complete()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    ipython, jedi = out.strip().splitlines()
    assert "load" in ipython and "trace" in jedi, out


def test_python_dash_m_lens_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "lens", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "bench" in out
