"""Drive the widgets in a real browser: JupyterLab or Panel on 127.0.0.1, Debian's chromium via Playwright.

Used by the browser tests and by ``lens.bench.widgets``; not needed to use the widgets. Requirements:
``apt-get install -y chromium`` and ``pip install jupyterlab playwright`` (never ``playwright install``:
the system chromium is launched through ``executable_path``).

Everything a run creates (Jupyter config, data, runtime and IPython dirs, settings) lives in a temporary
folder, the servers listen on 127.0.0.1 only, and the browser blocks every request that does not go to that
server, so a widget that tried to reach the internet would fail loudly instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from lens.errors import ConfigError

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "chromium_available",
    "free_port",
    "jupyterlab",
    "panel_server",
    "chromium",
    "Page",
    "write_notebook",
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_available() -> bool:
    """Whether Debian's chromium is installed where the harness launches it from.

    Example: ``pytest.mark.skipif(not chromium_available(), reason="apt-get install -y chromium")``.
    """
    return os.access(CHROMIUM, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now. Example: ``port = free_port()``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def write_notebook(path: Path, cells: list[str]) -> Path:
    """Write a python3 notebook whose code cells are ``cells``. Example: ``write_notebook(p, ["1 + 1"])``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    return path


@contextlib.contextmanager
def jupyterlab(root_dir: Path, *, timeout: float = 90) -> Iterator[str]:
    """Start JupyterLab headless on 127.0.0.1 (no token, no browser) serving ``root_dir``; yield its URL.

    Config, data, runtime and IPython dirs are temporary; the notebook opens without windowing (so every
    output is in the DOM) and without news or update checks.

    Example::

        with jupyterlab(folder) as url:
            page.goto(f"{url}/lab/tree/test.ipynb")
    """
    home = Path(tempfile.mkdtemp(prefix="lens-jupyter-"))
    try:
        settings = home / "config" / "lab" / "user-settings" / "@jupyterlab"
        for plugin, values in {
            "notebook-extension/tracker": {"windowingMode": "none"},
            "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            target = settings / f"{plugin}.jupyterlab-settings"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "IPYTHONDIR": str(home / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        }
        port = free_port()
        log = home / "server.log"
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--allow-root",  # CI containers often run as root; the server still listens on 127.0.0.1 only
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={root_dir}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root_dir)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_http(f"{url}/api/status", proc, timeout, log)
            yield url
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def panel_server(script: Path, port: int, *args: str, timeout: float = 90, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``script`` (which calls ``pn.serve(..., address="127.0.0.1", port=port, show=False)``) in a
    subprocess; yield the URL once it answers.

    Example::

        with panel_server(app_py, port) as url:
            page.goto(url)
    """
    log = script.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=script.parent)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc, timeout, log)
        yield url
    finally:
        _stop(proc)


class Page:
    """A Playwright page that records console errors, page errors and blocked requests.

    ``errors`` collects console messages of type "error" and uncaught exceptions; ``blocked`` the URLs of
    requests to anything but ``allowed_origin`` (they are aborted).

    Example::

        page = new_page("http://127.0.0.1:8888")       # from chromium()
        page.page.goto("http://127.0.0.1:8888/lab")
        assert page.errors == [] and page.blocked == []
    """

    def __init__(self, page, allowed_origin: str | None):
        self.page = page
        self.errors: list[str] = []
        self.blocked: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

        def route(r):
            url = r.request.url
            if url.startswith(("data:", "blob:", "file:")) or (allowed_origin and url.startswith(allowed_origin)):
                r.continue_()
            else:
                self.blocked.append(url)
                r.abort()

        page.route("**/*", route)

    def canvas_ink(self, selector: str) -> int:
        """Pixels that differ from the canvas's top-left corner in the first element matching ``selector``
        (0: the canvas is blank). Example: ``page.canvas_ink(".lens-heatmap canvas") > 0``."""
        return self.page.eval_on_selector(
            selector,
            """(c) => { const ctx = c.getContext('2d'); const d = ctx.getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 0; i < d.length; i += 4) {
                  if (d[i] !== d[0] || d[i+1] !== d[1] || d[i+2] !== d[2] || d[i+3] !== d[3]) n++; }
                return n; }""",
        )

    def canvas_hash(self, selector: str) -> str:
        """A digest of the pixels of the canvas matching ``selector`` (to tell that a redraw changed it).

        Example: ``before = page.canvas_hash(sel); click(); assert page.canvas_hash(sel) != before``.
        """
        return self.page.eval_on_selector(
            selector,
            """(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let h = 2166136261 >>> 0; for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; }
                return c.width + 'x' + c.height + ':' + h.toString(16); }""",
        )

    def dataset(self, selector: str) -> dict[str, Any]:
        """The ``data-*`` attributes of the first element matching ``selector``.

        Example: ``page.dataset(".lens-attention-explorer")["renderMs"]``.
        """
        return self.page.eval_on_selector(selector, "(e) => Object.assign({}, e.dataset)")

    def wait_dataset(self, selector: str, timeout: float = 30, **expected: str) -> dict[str, Any]:
        """Poll until the element's ``data-*`` attributes include ``expected`` (strings); return them all.

        Polls from Python because Playwright selectors pierce Panel's shadow DOM and
        ``document.querySelector`` in a page function does not.

        Example: ``page.wait_dataset(".lens-attention-explorer", layer="0", head="3", state="ready")``.
        """
        deadline = time.monotonic() + timeout
        data: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.page.locator(selector).count():
                data = self.dataset(selector)
                if all(data.get(k) == v for k, v in expected.items()):
                    return data
            self.page.wait_for_timeout(50)
        raise TimeoutError(f"{selector} never had {expected}; last data-*: {data}; page errors: {self.errors}")


@contextlib.contextmanager
def chromium(*, viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """Launch Debian's chromium headless through Playwright; yields a function ``new_page(origin) → Page``.

    Example::

        with chromium() as new_page:
            page = new_page("http://127.0.0.1:8888")
    """
    if not chromium_available():
        raise ConfigError(f"no chromium at {CHROMIUM}; install it with apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            def new_page(origin: str | None = None, color_scheme: str = "light") -> Page:
                context = browser.new_context(viewport=viewport or {"width": 1400, "height": 1000},
                                              color_scheme=color_scheme)
                return Page(context.new_page(), origin)

            yield new_page
        finally:
            browser.close()


def lab_run_all(page: Page, url: str, notebook: str, *, timeout: float = 180) -> None:
    """Open ``notebook`` in JupyterLab, wait for an idle kernel, and run all cells.

    JupyterLab ignores a run request while the kernel is still starting, so wait until it reports idle;
    the app is exposed (``expose_app_in_browser``) so that "run all" is a command, not a focus-dependent
    key press.

    Example: ``lab_run_all(page, url, "widgets.ipynb")``.
    """
    p = page.page
    p.goto(f"{url}/lab/tree/{notebook}")
    p.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                        "window.jupyterapp.shell.currentWidget.sessionContext", timeout=timeout * 1000)
    p.wait_for_function(
        """() => { const w = window.jupyterapp.shell.currentWidget; const k = w.sessionContext.session?.kernel;
                   return w.context.isReady && k && k.status === 'idle'; }""",
        timeout=timeout * 1000,
    )
    p.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


def wait_for_file(path: Path, timeout: float, page: Page | None = None) -> str:
    """Poll until ``path`` exists and is not empty (the notebook writes it); return its text.

    Example: ``json.loads(wait_for_file(root / "selection.json", 20, page))``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        if page is not None:
            page.page.wait_for_timeout(250)
        else:
            time.sleep(0.25)
    raise TimeoutError(f"{path} was not written within {timeout:.0f} s" + (f"; page errors: {page.errors}" if page else ""))
