"""The admin page: jobs (cancel any), workers (status, memory, models), this web process (memory, and
proof that it holds no model), users (add, role, disable), and the store (size, verify)."""

from __future__ import annotations

import html
import time

import pandas as pd
import panel as pn

from lens.errors import LensError

from .inputs import human_bytes
from .session import message_pane, sentence, show_message
from .shared import process_facts

__all__ = ["AdminPage"]


class AdminPage:
    """See the module docstring (admins only: the page is not built for members)."""

    def __init__(self, session):
        self.s = session
        self.jobs = pn.widgets.Tabulator(self._jobs_frame([]), selectable="checkbox", disabled=True, show_index=False,
                                         height=260, sizing_mode="stretch_width", layout="fit_data_fill",
                                         css_classes=["lens-admin-jobs"])
        self.cancel = pn.widgets.Button(name="Cancel selected jobs", width=180)
        self.workers = pn.widgets.Tabulator(self._workers_frame([]), disabled=True, show_index=False, height=160,
                                            sizing_mode="stretch_width", layout="fit_data_fill",
                                            css_classes=["lens-admin-workers"])
        self.process = pn.pane.HTML("", css_classes=["lens-admin-process"], sizing_mode="stretch_width")
        self.users = pn.widgets.Tabulator(self._users_frame(), selectable=1, disabled=True, show_index=False,
                                          height=180, sizing_mode="stretch_width", css_classes=["lens-admin-users"])
        self.new_name = pn.widgets.TextInput(name="User name", width=160)
        self.new_password = pn.widgets.PasswordInput(name="Password (≥ 8 characters)", width=200)
        self.new_role = pn.widgets.Select(name="Role", options=["member", "admin"], width=110)
        self.add_user = pn.widgets.Button(name="Add user", button_type="primary", width=100)
        self.toggle = pn.widgets.Button(name="Disable / enable selected", width=200)
        self.store_info = pn.pane.HTML("", sizing_mode="stretch_width")
        self.verify = pn.widgets.Button(name="Verify the store", width=150)
        self.message = message_pane("lens-admin-message")
        self.cancel.on_click(self._on_cancel)
        self.add_user.on_click(self._on_add_user)
        self.toggle.on_click(self._on_toggle)
        self.verify.on_click(self._on_verify)
        self.refresh(deep=True)
        session.every(5, self.refresh, page="admin")
        self.panel = pn.Column(
            self.message,
            pn.pane.HTML("<h3>Jobs</h3>"), self.jobs, self.cancel,
            pn.pane.HTML("<h3>Workers</h3>"), self.workers,
            pn.pane.HTML("<h3>This web process</h3>"), self.process,
            pn.pane.HTML("<h3>Users</h3>"), self.users,
            pn.Row(self.new_name, self.new_password, self.new_role, self.add_user), self.toggle,
            pn.pane.HTML("<h3>Store</h3>"), self.store_info, self.verify,
            sizing_mode="stretch_width",
        )

    # -- frames ---------------------------------------------------------------------------------------
    @staticmethod
    def _jobs_frame(jobs) -> pd.DataFrame:
        return pd.DataFrame(
            [[j.id, j.owner, j.kind, j.model, j.status, f"{100 * j.progress:.0f}%", time.strftime("%m-%d %H:%M:%S", time.gmtime(j.created)),
              f"{(j.finished or time.time()) - (j.started or j.created):.1f}" if j.started else "", j.worker_id or "",
              j.result_id or "", (j.error or "")[:160]] for j in jobs],
            columns=["job", "owner", "kind", "model", "status", "progress", "queued (UTC)", "seconds", "worker", "result", "error"])

    @staticmethod
    def _workers_frame(workers) -> pd.DataFrame:
        now = time.time()
        return pd.DataFrame(
            [[w.id, w.host, w.pid, w.status, w.job_id or "", human_bytes(w.rss_bytes), w.jobs_done,
              f"{now - w.heartbeat:.0f} s ago", ", ".join(f"{n}:{'/'.join(i.get('quant', []))}" for n, i in w.models.items()),
              (w.error or "")[:120]] for w in workers],
            columns=["worker", "host", "pid", "status", "job", "memory", "jobs done", "heartbeat", "models", "error"])

    def _users_frame(self) -> pd.DataFrame:
        return pd.DataFrame([[u.name, u.role, "disabled" if u.disabled else "active",
                              time.strftime("%Y-%m-%d", time.gmtime(u.created))] for u in self.s.store.users.list()],
                            columns=["user", "role", "state", "since"])

    # -- refresh --------------------------------------------------------------------------------------
    def refresh(self, deep: bool = False) -> None:
        store = self.s.store
        self.jobs.value = self._jobs_frame(store.jobs.list(limit=100))
        self.workers.value = self._workers_frame([w for w in store.workers.list()
                                                  if w.status in ("loading", "idle", "busy") or time.time() - w.heartbeat < 600])
        facts = process_facts(scan_objects=deep)
        holds = ("" if not deep else
                 f" · torch modules with parameters: <b>{facts['torch_modules_with_parameters']}</b> · lens models: "
                 f"<b>{facts['lens_models']}</b>")
        cache = self.s.shared.runs.stats()
        self.process.object = (
            f"<div class='lens-admin-process-facts'><p>pid {facts['pid']} · memory <b>{human_bytes(facts['rss_bytes'])}</b> · sessions {self.s.shared.sessions} "
            f"(since start {self.s.shared.sessions_total}) · run cache {cache['runs']} runs, {human_bytes(cache['bytes'])}</p>"
            f"<p>Model weights in this process: transformers modelling modules imported: "
            f"<b>{len(facts['transformers_modeling_modules'])}</b>{holds} (the workers hold the models).</p></div>")
        count = store.count()
        counts = store.jobs.counts()
        self.store_info.object = (f"<p>{html.escape(str(store.root))} · index {html.escape(store.index.display_url)} · "
                                  f"{count} entries · jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "</p>")

    def on_show(self) -> None:
        self.refresh()

    # -- actions --------------------------------------------------------------------------------------
    def _on_cancel(self, _=None) -> None:
        frame = self.jobs.value
        ids = [str(frame.iloc[i]["job"]) for i in self.jobs.selection if i < len(frame)]
        try:
            for job_id in ids:
                self.s.store.jobs.cancel(job_id, by=self.s.user, is_admin=True)
        except LensError as exc:
            return show_message(self.message, sentence(exc), "danger")
        show_message(self.message, f"Cancelled {len(ids)} job(s).", "success")
        self.refresh()

    def _on_add_user(self, _=None) -> None:
        try:
            self.s.store.users.add(self.new_name.value.strip(), self.new_password.value, role=self.new_role.value)
        except LensError as exc:
            return show_message(self.message, f"User not added: {exc}", "danger")
        show_message(self.message, f"User {self.new_name.value.strip()} added ({self.new_role.value}).", "success")
        self.new_password.value = ""
        self.users.value = self._users_frame()

    def _on_toggle(self, _=None) -> None:
        frame = self.users.value
        rows = [i for i in self.users.selection if i < len(frame)]
        if not rows:
            return show_message(self.message, "Select a user.", "warning")
        name = str(frame.iloc[rows[0]]["user"])
        if name == self.s.user:
            return show_message(self.message, "You cannot disable yourself.", "warning")
        user = self.s.store.users.get(name)
        self.s.store.users.disable(name, not user.disabled)
        show_message(self.message, f"{name} {'enabled' if user.disabled else 'disabled'}.", "success")
        self.users.value = self._users_frame()

    async def _on_verify(self, _=None) -> None:
        import asyncio

        show_message(self.message, "Verifying every file's checksum…", "info")
        # reading every file takes a while on a large store: off the event loop, other sessions keep going
        report = await asyncio.get_running_loop().run_in_executor(None, self.s.store.verify)
        show_message(self.message, str(report).splitlines()[0] + (": " + "; ".join(report.problems[:3]) if report.problems else ""),
                     "success" if report.ok else "danger")
