"""``lens serve``: the web process (Panel/Bokeh on Tornado) and, on this host, the worker pool.

The web process serves saved runs and scans from the store; it never loads a model (the workers do —
see ``/api/status`` and the admin page). It refuses to listen beyond loopback without auth, signs its
cookies with a secret persisted in the store's index (so restarts and several hosts keep sessions valid),
turns on Tornado's XSRF protection for every form, and checks websocket origins.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import socket
from typing import Any, Callable

from lens.errors import ConfigError
from lens.store.config import ServeConfig, is_loopback
from lens.store.core import Store

__all__ = ["serve", "check_listen_policy", "MAX_MESSAGE_BYTES"]

log = logging.getLogger("lens.serve")

#: Largest websocket message (an upload travels base64-encoded in one): the uploads' limits are checked on
#: arrival with a message on the page; above this the browser's connection is closed instead.
MAX_MESSAGE_BYTES = 32 * 1024**2


def check_listen_policy(config: ServeConfig, store: Store) -> None:
    """Refuse what would expose the team's runs: no auth beyond loopback; auth without any user."""
    if not config.auth and not is_loopback(config.address):
        raise ConfigError(
            f"refusing to listen on {config.address} without auth: anyone who can reach this machine would read and "
            "delete the team's runs. Keep auth on (the default) and add users with lens serve adduser NAME --admin, "
            "or listen on 127.0.0.1"
        )
    if config.auth and store.users.count() == 0:
        raise ConfigError(
            f"the store at {store.root} has no users, so nobody could sign in; add one first: "
            f"lens serve adduser NAME --admin --store {store.root}"
        )


def _status_handler(shared):
    from tornado.web import RequestHandler

    from .shared import process_facts

    class StatusHandler(RequestHandler):
        """``GET /api/status``: this process's memory and the models it holds (none), the workers and the
        queue — for admins (or anyone, when auth is off on loopback)."""

        def get(self):
            if shared.auth:
                from .auth import COOKIE, COOKIE_DAYS

                raw = self.get_secure_cookie(COOKIE, max_age_days=COOKIE_DAYS)
                name = raw.decode() if raw else None
                if not name or shared.store.users.role(name) != "admin":
                    self.set_status(403)
                    return self.finish({"error": "sign in as an admin"})
            workers = [{"id": w.id, "pid": w.pid, "host": w.host, "status": w.status, "rss_bytes": w.rss_bytes,
                        "job_id": w.job_id, "jobs_done": w.jobs_done, "models": sorted(w.models)}
                       for w in shared.store.workers.list(alive_only=True)]
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            deep = self.get_argument("deep", "0") == "1"
            if deep:  # a deep look also collects garbage first, so that the counts are of live objects
                import gc

                gc.collect()
            bokeh_sessions = sum(len(list(ctx.sessions)) for ctx in self.application._applications.values()) \
                if hasattr(self.application, "_applications") else None
            self.finish(json.dumps({"web": process_facts(scan_objects=deep), "bokeh_sessions": bokeh_sessions,
                                    "sessions": shared.sessions, "run_cache": shared.runs.stats(),
                                    "workers": workers, "jobs": shared.store.jobs.counts()}))

    return StatusHandler


def _fixed_mmap_threshold(size: int = 1 << 20) -> None:
    """Large blocks (≥ 1 MiB) always straight from mmap, so that they go back to the system when freed.

    glibc raises its mmap threshold to the size of any mmapped block that is freed (up to 32 MiB); after the
    first sign-in, every scrypt check (16 MiB of scratch memory) is then carved from a thread's heap, and a
    burst of sign-ins leaves each thread's heap at its peak for good — ~100 MB that ``malloc_trim`` cannot
    return. A fixed threshold turns the dynamic adjustment off (mallopt M_MMAP_THRESHOLD = -3).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, size)
    except (OSError, AttributeError):  # not glibc
        pass


def _encrypt_oauth_tokens(pn, store: Store) -> None:
    """Have Panel encrypt the identity provider's tokens in cookies (Fernet; the key is persisted in the
    store's index, so restarts and other hosts can read them). Needs ``cryptography``."""
    import base64

    try:
        from cryptography.fernet import Fernet
    except ImportError:
        log.warning("OAuth tokens are kept in signed but unencrypted cookies: pip install cryptography to encrypt them")
        return
    key = store.setting("oauth_encryption_key", lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    pn.config._oauth_encryption_key = key.encode()
    pn.state.encryption = Fernet(key.encode())


def serve(config: ServeConfig, *, on_ready: Callable[[Any], None] | None = None) -> None:
    """Run the dashboard until SIGINT/SIGTERM: check the policy, start the workers, serve on
    ``config.address:config.port``. ``on_ready(server)`` is called once it listens.

    Raises ``ConfigError`` (before listening) for a configuration that would be unsafe or cannot work.
    """
    store = Store(config.store, config.index or None)
    check_listen_policy(config, store)  # before anything slow: a refusal should be immediate

    _fixed_mmap_threshold()
    import panel as pn

    from .auth import LensAuth
    from .session import build_dashboard
    from .shared import Shared

    secret = store.setting("cookie_secret", lambda: secrets.token_urlsafe(48))
    shared = Shared(config, store, auth=config.auth)
    shared.config_user = store.user
    origins = {f"{config.address}:{config.port}", f"localhost:{config.port}", f"127.0.0.1:{config.port}"}
    if not is_loopback(config.address):
        origins.add(f"{socket.getfqdn()}:{config.port}")
    origins.update(config.allow_websocket_origin)

    pool = None
    if config.workers:
        from lens.store.pool import WorkerPool

        pool = WorkerPool(config).start()
    kwargs: dict[str, Any] = {}
    if config.auth and config.oauth_provider:
        # sign-in by an identity provider through Panel's OAuth handlers; the store still decides who may
        # use the dashboard and with which role (build_dashboard looks pn.state.user up in its users)
        import os

        kwargs.update(oauth_provider=config.oauth_provider, oauth_key=config.oauth_key,
                      oauth_secret=config.oauth_secret or os.environ.get("LENS_OAUTH_SECRET", ""),
                      oauth_redirect_uri=config.oauth_redirect_uri or None,
                      oauth_extra_params=dict(config.oauth_extra_params))
        _encrypt_oauth_tokens(pn, store)
    elif config.auth:
        kwargs["auth_provider"] = LensAuth(store, secure_cookies=config.secure_cookies)
    server = pn.serve(
        {"/": lambda: build_dashboard(shared)},
        address=config.address, port=config.port, show=False, start=False, title="lens",
        websocket_origin=sorted(origins), cookie_secret=secret, xsrf_cookies=True, liveness=True,
        websocket_max_message_size=MAX_MESSAGE_BYTES, extra_patterns=[(r"/api/status", _status_handler(shared))],
        check_unused_sessions_milliseconds=5_000, unused_session_lifetime_milliseconds=15_000,
        **kwargs,
    )
    loop = server.io_loop

    def stop(signum, frame):
        log.info("lens serve: stopping (signal %s)", signum)
        loop.add_callback_from_signal(loop.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start()
        where = f"http://{config.address}:{server.port}/"
        log.info("lens serve: %s (store %s, index %s, %d workers, auth %s)", where, store.root,
                 store.index.display_url, config.workers, "on" if config.auth else "off")
        print(f"lens serve: listening on {where}", flush=True)
        if on_ready is not None:
            loop.add_callback(on_ready, server)
        loop.start()
    finally:
        try:
            server.stop()
        finally:
            if pool is not None:
                pool.stop()
