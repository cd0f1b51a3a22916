"""``lens bench serve``: the team dashboard under load — concurrent sessions on loopback while jobs run.

Each session is a protocol-level client, not a browser (20 browsers would measure the load generator on
2 cores): it signs in over HTTP (login form, XSRF token, signed cookie), loads the page, opens the Bokeh
websocket, pulls the document, and then, until the time is up, opens a saved run (the "open a run by id"
field) and switches between its views (SinkMap, ValleyPlot, AttentionExplorer, TokenView), with a short
think time between actions. A **view latency** is the time from sending the change to receiving the
server's update that carries the new view. Meanwhile a job at a time runs on the workers.

Baselines in the same run: one session alone (the latency ratio), and the web process's memory after a
warm-up session (before), its peak while the sessions run (during), and after they closed and the server
discarded them (after). Goals (docs/serve.md#under-load): 0 errors, p95 < 2 s, memory after within 10 % of before.

Example: ``lens bench serve --sessions 20 --duration 120`` (``--quick``: 4 sessions, 20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["main", "run", "format_table"]

VIEWS = ["SinkMap", "ValleyPlot", "AttentionExplorer", "TokenView"]
#: seconds a user looks at a view before the next click (uniform): an active user, ≈ 24 clicks a minute
THINK = (1.0, 4.0)
_MARKER = re.compile(r"lens-view-title[^\"]*?data-view=(?:'|&#x27;|&#39;|\\\")(\w+)(?:'|&#x27;|&#39;|\\\") "
                     r"data-run=(?:'|&#x27;|&#39;|\\\")([0-9a-f,]+)(?:'|&#x27;|&#39;|\\\") "
                     r"data-n=(?:'|&#x27;|&#39;|\\\")(\d+)")
_TEXTS = [
    "The capital of France is Paris.", "Attention sinks form on the first token of many layers.",
    "Massive activations are rare but very large values in the residual stream.",
    "A compression valley is a range of layers where the representation entropy dips.",
    "Sparse attention skips blocks whose scores are small.", "Low-bit weights store four bits per value.",
    "Researchers open notebooks, load a model, and look at what it does inside.",
    "Numbers like 3.14159 and 2026 and punctuation: commas; dashes - and (parentheses).",
]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Stats:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sessions_opened: int = 0


class _Client:
    """One signed-in dashboard session spoken to over HTTP and the Bokeh websocket protocol."""

    def __init__(self, base: str, user: str, password: str, runs: list[str], stats: _Stats, rng: random.Random):
        self.base, self.user, self.password, self.runs, self.stats, self.rng = base, user, password, runs, stats, rng
        self.cookies: dict[str, str] = {}
        self.n = 0
        self.view = None
        self.run_id = None

    def _cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def _keep_cookies(self, response) -> None:
        for header in response.headers.get_list("Set-Cookie"):
            name, _, rest = header.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]

    async def _http(self, path: str, body: dict[str, str] | None = None):
        from urllib.parse import urlencode

        from tornado.httpclient import AsyncHTTPClient, HTTPRequest

        request = HTTPRequest(f"{self.base}{path}", method="POST" if body is not None else "GET",
                              body=urlencode(body) if body is not None else None, follow_redirects=False,
                              headers={"Cookie": self._cookie_header()}, request_timeout=60)
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        self._keep_cookies(response)
        return response

    async def connect(self) -> None:
        from bokeh.client.websocket import WebSocketClientConnectionWrapper
        from bokeh.protocol import Protocol
        from bokeh.protocol.receiver import Receiver
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        page = (await self._http("/login")).body.decode()
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)
        login = await self._http("/login", {"_xsrf": xsrf, "username": self.user, "password": self.password, "next": "/"})
        if login.code != 302:
            raise RuntimeError(f"sign-in of {self.user} answered {login.code}")
        page = await self._http("/")
        if page.code != 200:
            raise RuntimeError(f"the dashboard answered {page.code}")
        token = re.search(r'"token":"([^"]+)"', page.body.decode()).group(1)
        ws_url = self.base.replace("http://", "ws://") + "/ws"
        request = HTTPRequest(ws_url, headers={"Cookie": self._cookie_header(), "Origin": self.base})
        self.socket = await websocket_connect(request, subprotocols=["bokeh", token], max_message_size=64 * 1024**2)
        self.wrapper = WebSocketClientConnectionWrapper(self.socket)
        self.protocol = Protocol()
        self.receiver = Receiver(self.protocol)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())
        await self._expect("ACK")
        await self.protocol.create("PULL-DOC-REQ").send(self.wrapper)
        reply = await self._expect("PULL-DOC-REPLY")
        self.ids = _find_models(reply.content["doc"])
        self.view_labels = self.ids["view_labels"]
        self.stats.sessions_opened += 1

    async def _read(self) -> None:
        while True:
            fragment = await self.socket.read_message()
            if fragment is None:
                await self.inbox.put(None)
                return
            message = await self.receiver.consume(fragment)
            if message is not None:
                await self.inbox.put(message)

    async def _expect(self, msgtype: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(self.inbox.get(), max(0.01, deadline - time.monotonic()))
            if message is None:
                raise RuntimeError("the server closed the websocket")
            if message.msgtype == msgtype:
                return message
            if message.msgtype == "ERROR":
                raise RuntimeError(f"server error: {message.content}")

    async def _change(self, model_id: str, attr: str, value: Any, expect_view: str, expect_run: str,
                      timeout: float = 30) -> float:
        """Send one property change; return the seconds until the update with the expected view arrives."""
        header = json.dumps({"msgid": uuid.uuid4().hex, "msgtype": "PATCH-DOC"})
        content = json.dumps({"events": [{"kind": "ModelChanged", "model": {"id": model_id}, "attr": attr, "new": value}]})
        start = time.perf_counter()
        for frame in (header, "{}", content):
            await self.socket.write_message(frame)
        want = self.n + 1
        deadline = time.monotonic() + timeout
        while True:
            message = await asyncio.wait_for(self.inbox.get(), max(0.01, deadline - time.monotonic()))
            if message is None:
                raise RuntimeError("the server closed the websocket")
            if message.msgtype == "ERROR":
                raise RuntimeError(f"server error: {message.content}")
            if message.msgtype != "PATCH-DOC":
                continue
            for view, run, n in _MARKER.findall(message.content_json if hasattr(message, "content_json") else json.dumps(message.content)):
                if int(n) >= want:
                    elapsed = time.perf_counter() - start
                    self.n = int(n)
                    if view != expect_view or run != expect_run:
                        raise RuntimeError(f"expected {expect_view} of {expect_run}, got {view} of {run}")
                    return elapsed

    async def open_run(self) -> float:
        choices = [r for r in self.runs if r != self.run_id] or self.runs
        self.run_id = self.rng.choice(choices)
        elapsed = await self._change(self.ids["run_id"], "value", self.run_id, "SinkMap", self.run_id)
        self.view = "SinkMap"
        return elapsed

    async def switch_view(self) -> float:
        view = self.rng.choice([v for v in VIEWS if v != self.view])
        elapsed = await self._change(self.ids["view_kind"], "active", self.view_labels.index(view), view, self.run_id)
        self.view = view
        return elapsed

    async def close(self) -> None:
        self.socket.close()
        self.reader.cancel()


def _find_models(doc: dict) -> dict[str, Any]:
    """Ids of the run-id field and the view switch in a pulled document (found by their CSS classes)."""
    found: dict[str, Any] = {}

    def walk(node):
        if isinstance(node, dict):
            attrs = node.get("attributes")
            if isinstance(attrs, dict) and "id" in node:
                classes = attrs.get("css_classes") or []
                if "lens-run-id" in classes:
                    found["run_id"] = node["id"]
                if "lens-view-kind" in classes:
                    found["view_kind"] = node["id"]
                    found["view_labels"] = attrs.get("labels")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    missing = {"run_id", "view_kind"} - set(found)
    if missing:
        raise RuntimeError(f"the dashboard page has no {missing}; is this lens serve?")
    return found


async def _session(base, user, password, runs, stats, deadline, seed, think=THINK) -> None:
    rng = random.Random(seed)
    client = _Client(base, user, password, runs, stats, rng)
    try:
        await client.connect()
        while time.monotonic() < deadline:
            stats.latencies.append(await client.open_run())
            await asyncio.sleep(rng.uniform(*think))
            for _ in range(rng.randint(1, 3)):
                if time.monotonic() >= deadline:
                    break
                stats.latencies.append(await client.switch_view())
                await asyncio.sleep(rng.uniform(*think))
    except Exception as exc:  # every failure is an error of the run, reported with its reason
        stats.errors.append(f"{user}: {type(exc).__name__}: {exc}")
    finally:
        if hasattr(client, "socket"):
            await client.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(*, sessions: int = 20, duration: float = 120.0, workers: int = 1, seed_runs: int = 8,
        solo: float = 20.0, settle: float = 30.0, keep: Path | None = None,
        server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``lens serve`` on a free loopback port with a fresh store, seed runs through the workers, then
    measure one session alone and ``sessions`` at once for ``duration`` seconds (see the module docstring)."""
    import lens.store
    from lens.store.jobs import JobQueue

    from lens.widgets._browser import free_port  # a tiny helper; the bench imports no view code

    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lens-bench-serve-"))
    store = lens.store.open(root / "store")
    password = secrets.token_urlsafe(12)
    users = [f"user{i:02d}" for i in range(sessions)]
    if store.users.count() == 0:
        store.users.add("bench", password, role="admin")
        for user in users:
            store.users.add(user, password)
    else:  # a kept store from an earlier run: reset the passwords we need
        for user in ["bench", *users]:
            try:
                store.users.set_password(user, password)
            except Exception:
                store.users.add(user, password)
    config = root / "lens-serve.toml"
    config.write_text(f'[store]\npath = "store"\n\n[server]\nworkers = {workers}\n\n[limits]\njobs_per_user = 1000\n'
                      '\n[[models]]\nname = "minilm"\nattention = ["dense"]\n')
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lens", "serve", "--config", str(config), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(server_env or {})})
    base = f"http://127.0.0.1:{port}"
    jobs: JobQueue = store.jobs
    result: dict[str, Any] = {"sessions": sessions, "duration_s": duration, "workers": workers,
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "platform": platform.platform()}}
    try:
        _wait_ready(base, proc, store)
        # the saved runs the sessions open: made by the workers, like the team's
        seeded = [jobs.submit("bench", "trace", "minilm", {"texts": _TEXTS[i % 8:] + _TEXTS[:i % 8][: 2 + i % 5]}).id
                  for i in range(seed_runs)]
        runs = [_wait_job(store, j).result_id for j in seeded]
        memory = {"start": _rss(proc.pid)}
        # warm-up: one session through every view of every run (imports, first renders, the run cache), then gone
        warm = _Stats()
        asyncio.run(_warm_up(base, password, runs, warm))
        if warm.errors:
            raise RuntimeError(f"the warm-up session failed: {warm.errors}")
        memory["before"] = _settled_rss(proc.pid, settle)
        kinds = {"before": rss_by_kind(proc.pid)}
        objects = {"before": _objects(_admin_status(base, password))}
        solo_stats = _Stats()
        asyncio.run(_session(base, "bench", password, runs, solo_stats, time.monotonic() + solo, seed=1))
        load_stats, peak, done = _Stats(), [memory["before"]], []
        before_done = jobs.counts().get("done", 0)
        asyncio.run(_load(base, users, password, runs, load_stats, duration, store, peak, proc.pid))
        done = jobs.counts().get("done", 0) - before_done
        memory["during_peak"] = max(peak)
        memory["after"] = _settled_rss(proc.pid, settle)
        kinds["after"] = rss_by_kind(proc.pid)
        status = _admin_status(base, password)
        objects["after"] = _objects(status)
        result.update({
            "runs": len(runs),
            "solo": {"views": len(solo_stats.latencies), "p50_s": _percentile(solo_stats.latencies, 0.5),
                     "p95_s": _percentile(solo_stats.latencies, 0.95), "errors": solo_stats.errors},
            "load": {"sessions_opened": load_stats.sessions_opened, "views": len(load_stats.latencies),
                     "p50_s": _percentile(load_stats.latencies, 0.5), "p95_s": _percentile(load_stats.latencies, 0.95),
                     "max_s": max(load_stats.latencies, default=float("nan")), "errors": load_stats.errors,
                     "jobs_completed": done},
            "memory_bytes": memory,
            "memory_after_over_before": memory["after"] / memory["before"],
            "server_objects": objects,
            "rss_by_kind": kinds,
            "think_s": list(THINK),
        })
        result["web_process"] = {k: status["web"][k] for k in ("transformers_modeling_modules", "torch_modules_with_parameters",
                                                                "lens_models")}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    result["store"] = str(root)
    result["server_env"] = server_env or {}
    return result


async def _warm_up(base, password, runs, stats) -> None:
    client = _Client(base, "bench", password, runs, stats, random.Random(0))
    try:
        await client.connect()
        for run_id in runs:
            client.runs = [run_id]
            client.run_id = None
            await client.open_run()
            for view in VIEWS[1:]:
                await client._change(client.ids["view_kind"], "active", client.view_labels.index(view), view, run_id)
                client.view = view
    except Exception as exc:
        stats.errors.append(f"warm-up: {type(exc).__name__}: {exc}")
    finally:
        if hasattr(client, "socket"):
            await client.close()


async def _load(base, users, password, runs, stats, duration, store, peak, pid) -> None:
    deadline = time.monotonic() + duration
    stop = asyncio.Event()

    async def jobs_and_memory():
        pending = None
        rng = random.Random(7)
        while not stop.is_set():
            peak.append(_rss(pid))
            if pending is None or store.jobs.get(pending).final:
                texts = rng.sample(_TEXTS, 4)
                pending = store.jobs.submit("bench", "trace", "minilm", {"texts": texts}).id
            await asyncio.sleep(1.0)

    watcher = asyncio.ensure_future(jobs_and_memory())
    # sessions arrive over the first few seconds, as people do
    tasks = []
    for i, user in enumerate(users):
        tasks.append(asyncio.ensure_future(_session(base, user, password, runs, stats, deadline, seed=100 + i)))
        await asyncio.sleep(0.25)
    await asyncio.gather(*tasks)
    stop.set()
    await watcher


def _wait_ready(base: str, proc: subprocess.Popen, store, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lens serve exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(f"{base}/liveness", timeout=2)
            if "minilm" in store.workers.models():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("lens serve and its worker did not get ready")


def _wait_job(store, job_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.jobs.get(job_id)
        if job.final:
            if job.status != "done":
                raise RuntimeError(f"a seed job failed: {job.error}")
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} did not finish")


def rss_by_kind(pid: int) -> dict[str, int]:
    """Resident bytes of a process by kind of mapping (Linux ``/proc/PID/smaps``): ``heap`` (malloc's main
    arena), ``anonymous`` (other anonymous maps: CPython's object arenas, glibc's per-thread arenas, large
    buffers — the kernel merges neighbouring ones, so they are not told apart), ``file`` (libraries and mapped
    files), ``stack``."""
    kinds = {"heap": 0, "anonymous": 0, "file": 0, "stack": 0}
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            kind = None
            for line in fh:
                head = line.split(None, 5)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    name = head[5].strip() if len(head) > 5 else ""
                    kind = ("heap" if name == "[heap]" else "stack" if name.startswith("[stack") else
                            "file" if name.startswith("/") else "anonymous" if not name else None)
                elif head[0] == "Rss:" and kind is not None:
                    kinds[kind] += int(head[1]) * 1024
    except OSError:
        return {}
    return kinds


def _settled_rss(pid: int, settle: float) -> int:
    """RSS once the server has discarded closed sessions: wait ``settle`` s, then until it stops falling."""
    time.sleep(settle)
    last = _rss(pid)
    for _ in range(10):
        time.sleep(2.0)
        now = _rss(pid)
        if now >= last * 0.995:
            return now
        last = now
    return last


def _admin_status(base: str, password: str) -> dict[str, Any]:
    import http.cookiejar
    import urllib.parse
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base}/login", timeout=30).read().decode()
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)
    opener.open(f"{base}/login", data=urllib.parse.urlencode(
        {"_xsrf": xsrf, "username": "bench", "password": password, "next": "/liveness"}).encode(), timeout=30).read()
    return json.loads(opener.open(f"{base}/api/status?deep=1", timeout=60).read())


def _objects(status: dict[str, Any]) -> dict[str, Any]:
    return {"bokeh_sessions": status.get("bokeh_sessions"), "dashboard_sessions": status.get("sessions"),
            "open_widgets": status["web"].get("open_widgets"), "python_objects": status["web"].get("python_objects"),
            "run_cache": status.get("run_cache", {}).get("runs"),
            **{k: status["web"].get("allocator", {}).get(k) for k in ("python_blocks", "malloc_in_use", "malloc_free_held")}}


def _fmt(value, key: str) -> str:
    """Allocator bytes as MB, counts as they are."""
    if value is not None and key.startswith("malloc_"):
        return f"{value / 1e6:.0f} MB"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    solo, load, memory = result["solo"], result["load"], result["memory_bytes"]
    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
    ratio = load["p95_s"] / solo["p95_s"] if solo["p95_s"] else float("nan")
    lines = [
        f"lens bench serve — {result['sessions']} sessions × {result['duration_s']:.0f} s on loopback, "
        f"{result['workers']} worker(s), {result['runs']} saved runs; {result['machine']['cpus']} CPUs, "
        f"Python {result['machine']['python']}",
        "",
        f"{'':28}{'views':>8}{'p50':>9}{'p95':>9}{'max':>9}{'errors':>8}",
        f"{'1 session alone (baseline)':28}{solo['views']:>8}{solo['p50_s']:>8.3f}s{solo['p95_s']:>8.3f}s{'':>9}"
        f"{len(solo['errors']):>8}",
        f"{str(result['sessions']) + ' sessions at once':28}{load['views']:>8}{load['p50_s']:>8.3f}s{load['p95_s']:>8.3f}s"
        f"{load['max_s']:>8.3f}s{len(load['errors']):>8}",
        f"p95 with {result['sessions']} sessions / p95 alone: {ratio:.2f}×   (goal: p95 < 2 s, 0 errors)",
        f"jobs completed while the sessions ran: {load['jobs_completed']}",
        f"web process memory: start {mb(memory['start'])}, before (after a warm-up session) {mb(memory['before'])}, "
        f"during (peak) {mb(memory['during_peak'])}, after {mb(memory['after'])} → after/before "
        f"{result['memory_after_over_before']:.3f} (goal ≤ 1.10)",
        f"server objects before / after: " + ", ".join(
            f"{k} {_fmt(result['server_objects']['before'][k], k)} / {_fmt(result['server_objects']['after'][k], k)}"
            for k in result["server_objects"]["before"]),
        "web process resident memory by kind of mapping, before → after: " + ", ".join(
            f"{k} {mb(v)} → {mb(result['rss_by_kind']['after'].get(k, 0))}"
            for k, v in result.get("rss_by_kind", {}).get("before", {}).items()),
        f"think time between a user's clicks: {result['think_s'][0]:.0f}–{result['think_s'][1]:.0f} s",
        f"web process holds: transformers modelling modules {len(result['web_process']['transformers_modeling_modules'])}, "
        f"torch modules with parameters {result['web_process']['torch_modules_with_parameters']}, "
        f"lens models {result['web_process']['lens_models']}",
    ]
    for error in (solo["errors"] + load["errors"])[:10]:
        lines.append(f"  error: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=1, help="worker processes running jobs meanwhile")
    parser.add_argument("--quick", action="store_true", help="4 sessions for 20 s (a smoke test)")
    parser.add_argument("--json", type=Path, default=Path("bench-serve.json"))
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server only (e.g. PYTHONMALLOC=malloc)")
    args = parser.parse_args(argv)
    kwargs = dict(sessions=args.sessions, duration=args.duration, workers=args.workers,
                  server_env=dict(item.split("=", 1) for item in args.server_env))
    if args.quick:
        kwargs.update(sessions=4, duration=20.0, solo=8.0, settle=20.0, seed_runs=4)
    result = run(**kwargs)
    print(format_table(result))
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON written to {args.json}")
    return 0 if not result["load"]["errors"] and not result["solo"]["errors"] else 1
