"""One browser session of the dashboard: who is signed in, the pages, messages, and the clean-up.

The pages share a ``Session``: it knows the user and role (read from the store at every session start —
never from anything the browser sends besides the signed cookie), shows messages on the page, switches
tabs, and closes every lens widget the session opened when the browser goes away.
"""

from __future__ import annotations

import html
import logging
from typing import Callable

import panel as pn

from lens.errors import LensError

__all__ = ["Session", "build_dashboard", "message_pane", "show_message", "sentence"]

log = logging.getLogger("lens.serve")


_COLOURS = {"info": ("#e8f0fe", "#1a3d8f"), "success": ("#e6f4ea", "#14532d"), "warning": ("#fff4e5", "#7a4100"),
            "danger": ("#fdecea", "#8c1d18")}


def message_pane(css_class: str) -> pn.pane.HTML:
    """An in-page message area (empty until it has something to say); ``css_class`` names it for tests."""
    pane = pn.pane.HTML("", sizing_mode="stretch_width", margin=(4, 10))
    pane._lens_class = css_class
    return pane


def sentence(text) -> str:
    """An error message as a sentence: first letter capitalised, the rest untouched."""
    text = str(text)
    return text[:1].upper() + text[1:]


def show_message(pane: pn.pane.HTML, text: str, kind: str = "info") -> None:
    """Show ``text`` (plain text, escaped) in ``pane``; kind: info | success | warning | danger."""
    if not text:
        pane.object = ""
        return
    background, colour = _COLOURS[kind]
    pane.object = (f"<div class='lens-message {pane._lens_class}' data-kind='{kind}' role='alert' "
                   f"style='background:{background};color:{colour};padding:.55rem .8rem;border-radius:6px'>"
                   f"{html.escape(text)}</div>")


class Session:
    """The state of one signed-in browser session (see the module docstring)."""

    def __init__(self, shared, user: str, role: str):
        self.shared = shared
        self.store = shared.store
        self.config = shared.config
        self.user = user
        self.role = role
        self.tabs: pn.Tabs | None = None
        self.pages: dict[str, object] = {}
        self.builders: dict[str, Callable[["Session"], object]] = {}
        self.holders: dict[str, pn.Column] = {}
        self._widgets: list = []
        self._ticks: list[tuple[int, Callable[[], None], str | None]] = []
        self._n = 0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def track(self, widget):
        """Remember a lens widget so that it is closed with the session (returns it)."""
        self._widgets.append(widget)
        return widget

    def release(self, widget) -> None:
        """Close a lens widget the page no longer shows (with the Layout widget ipywidgets gave it: both
        sit in ipywidgets' global registry until closed)."""
        if widget in self._widgets:
            self._widgets.remove(widget)
        for part in (getattr(widget, "layout", None), widget):
            try:
                if part is not None:
                    part.close()
            except Exception:  # closing twice or a comm that is already gone
                pass

    def every(self, ticks: int, callback: Callable[[], None], *, page: str | None = None) -> None:
        """Call ``callback`` every ``ticks`` seconds while the session lives (only while ``page``'s tab is the
        one shown, if given: twenty sessions refreshing tables nobody looks at would slow everyone down)."""
        self._ticks.append((ticks, callback, page))

    def shown(self) -> str | None:
        """The name of the page whose tab is shown."""
        if self.tabs is None:
            return None
        names = list(self.holders)
        return names[self.tabs.active] if 0 <= self.tabs.active < len(names) else None

    def page(self, name: str):
        """The page ``name``, built on first use (a session only pays for the pages it opens)."""
        if name not in self.pages:
            page = self.builders[name](self)
            self.pages[name] = page
            self.holders[name].objects = [page.panel]
        return self.pages[name]

    def tick(self) -> None:
        self._n += 1
        shown = self.shown()
        for every, callback, page in list(self._ticks):
            if self._n % every == 0 and (page is None or page == shown):
                try:
                    callback()
                except LensError as exc:
                    log.warning("session of %s: %s", self.user, exc)
                except Exception:
                    log.exception("session of %s: periodic update failed", self.user)

    def go(self, page: str) -> None:
        """Switch to the tab of ``page`` (a key of ``holders``), building it if needed."""
        self.page(page)
        if self.tabs is not None and page in self.holders:
            self.tabs.active = list(self.holders).index(page)

    def _on_tab(self, event) -> None:
        name = self.shown()
        if name is not None:
            page = self.page(name)
            getattr(page, "on_show", lambda: None)()

    def close(self, *_) -> None:
        for widget in list(self._widgets):
            self.release(widget)
        self._ticks.clear()
        for page in self.pages.values():
            getattr(page, "close", lambda: None)()
        self.pages.clear()
        self.holders.clear()
        self.shared.sessions -= 1
        self.shared.trim()


def build_dashboard(shared) -> pn.viewable.Viewable:
    """The page of one session (Panel calls this once per browser tab)."""
    from .admin_page import AdminPage
    from .new_run_page import NewRunPage
    from .runs_page import RunsPage
    from .scans_page import ScansPage, VisionPage

    pn.extension("tabulator", notifications=False)
    doc = pn.state.curdoc
    if doc is not None:
        # Panel learns where its own CSS lives only when it renders the page; a model built before that (a
        # periodic callback racing the first render) would link loading.css from the CDN, which an offline
        # team network cannot reach. Say where it is from the start.
        from panel.io.resources import LOCAL_DIST

        doc._template_variables.setdefault("dist_url", f"{pn.state.rel_path}/{LOCAL_DIST}" if pn.state.rel_path else LOCAL_DIST)
    if shared.auth:
        user = pn.state.user
        role = shared.store.users.role(user) if user else None
        if role is None:  # the cookie's user was removed or disabled since the page was requested
            return pn.pane.HTML('<p>Your account is not active. <a href="./logout">Sign in again</a>.</p>')
    else:
        user, role = shared.config_user, "admin"
    session = Session(shared, user, role)
    shared.sessions += 1
    shared.sessions_total += 1
    session.builders = {"runs": RunsPage, "new": NewRunPage, "scans": ScansPage, "vision": VisionPage}
    if session.is_admin:
        session.builders["admin"] = AdminPage
    titles = {"runs": "Runs", "new": "New run", "scans": "Scans", "vision": "Vision", "admin": "Admin"}
    session.holders = {name: pn.Column(sizing_mode="stretch_width") for name in session.builders}
    session.page("runs")
    session.tabs = pn.Tabs(*[(titles[k], holder) for k, holder in session.holders.items()], dynamic=True,
                           sizing_mode="stretch_width", css_classes=["lens-tabs"])
    session.tabs.param.watch(session._on_tab, "active")
    who = html.escape(user)
    sign_out = ' · <a href="./logout" class="lens-logout">sign out</a>' if shared.auth else ""
    header = pn.Row(
        pn.pane.HTML("<h2 style='margin:0'>lens <span style='font-weight:400'>team dashboard</span></h2>"),
        pn.HSpacer(),
        pn.pane.HTML(f"<div class='lens-user'>signed in as <b>{who}</b> ({role}){sign_out}</div>"),
        sizing_mode="stretch_width", margin=(8, 10),
    )
    pn.state.add_periodic_callback(session.tick, period=1000)
    pn.state.on_session_destroyed(session.close)
    wanted = pn.state.session_args.get("run") if pn.state.session_args else None
    if wanted:
        session.page("runs").open(wanted[0].decode("utf-8", "replace"))
    return pn.Column(header, session.tabs, sizing_mode="stretch_width")
