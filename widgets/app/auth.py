"""Who may use the dashboard: lens's own login (users of the store, scrypt-hashed passwords).

``LensAuth`` is a Bokeh ``AuthProvider`` (the hook Panel's own OAuth providers use): every page load and
every websocket of a session call ``get_user``, which reads the signed ``user`` cookie (Tornado secure
cookie, HMAC with the store's persisted secret) and checks that the user still exists and is enabled. The
login form is protected against cross-site request forgery (Tornado's ``_xsrf`` token, enabled server-wide);
failed attempts are slowed per client and name; the cookie is ``HttpOnly``, ``SameSite=Lax``, and
``Secure`` behind TLS (``server.secure_cookies``).

Panel's OAuth providers (GitHub, Google, Azure, Okta, generic OIDC…) are the documented alternative when a
team signs in through an identity provider (docs/serve.md).
"""

from __future__ import annotations

import html
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from bokeh.server.auth_provider import AuthProvider
from tornado.ioloop import IOLoop
from tornado.web import RequestHandler

__all__ = ["LensAuth", "COOKIE", "COOKIE_DAYS", "LOGIN_URL", "LOGOUT_URL"]

COOKIE = "user"  # the name Panel's pn.state.user reads
COOKIE_DAYS = 7
LOGIN_URL = "/login"
LOGOUT_URL = "/logout"
_USER_CACHE_SECONDS = 5.0
_FAIL_WINDOW = 900.0
_FREE_FAILURES = 5


class _Throttle:
    """Failed logins per (client address, name): after 5 within 15 minutes, each further attempt waits
    2^(failures − 5) seconds (capped at 5 minutes) before it is even checked."""

    def __init__(self):
        self.failures: dict[tuple[str, str], list[float]] = {}

    def wait(self, key: tuple[str, str]) -> float:
        now = time.time()
        recent = [t for t in self.failures.get(key, []) if now - t < _FAIL_WINDOW]
        self.failures[key] = recent
        if len(recent) < _FREE_FAILURES:
            return 0.0
        return max(0.0, recent[-1] + min(2.0 ** (len(recent) - _FREE_FAILURES), 300.0) - now)

    def failed(self, key: tuple[str, str]) -> None:
        self.failures.setdefault(key, []).append(time.time())
        if len(self.failures) > 10_000:  # bound the memory an attacker can make us spend
            self.failures = dict(list(self.failures.items())[-5_000:])

    def succeeded(self, key: tuple[str, str]) -> None:
        self.failures.pop(key, None)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lens — sign in</title>
<style>
 body {{ font-family: system-ui, sans-serif; background: #f5f6f8; color: #1d232b; display: flex; min-height: 100vh;
        align-items: center; justify-content: center; margin: 0; }}
 form {{ background: #fff; padding: 2rem 2.2rem; border-radius: 10px; box-shadow: 0 2px 14px rgba(0,0,0,.08); width: 20rem; }}
 h1 {{ font-size: 1.3rem; margin: 0 0 1.2rem; }}
 label {{ display: block; font-size: .85rem; margin: .8rem 0 .25rem; }}
 input[type=text], input[type=password] {{ width: 100%; box-sizing: border-box; padding: .5rem; font-size: 1rem;
        border: 1px solid #c5cad3; border-radius: 6px; }}
 button {{ margin-top: 1.3rem; width: 100%; padding: .6rem; font-size: 1rem; border: 0; border-radius: 6px;
        background: #2a5bd7; color: #fff; cursor: pointer; }}
 .error {{ color: #b3261e; background: #fdecea; padding: .5rem .7rem; border-radius: 6px; font-size: .9rem; }}
 .note {{ color: #5b6470; font-size: .8rem; margin-top: 1rem; }}
</style></head>
<body><form method="post" action="{action}" class="lens-login">
<h1>lens — team dashboard</h1>
{error}
{xsrf}
<input type="hidden" name="next" value="{next}">
<label for="username">User name</label><input type="text" id="username" name="username" value="{username}" autocomplete="username" autofocus required>
<label for="password">Password</label><input type="password" id="password" name="password" autocomplete="current-password" required>
<button type="submit" id="login">Sign in</button>
<p class="note">An admin adds users with <code>lens serve adduser NAME</code>.</p>
</form></body></html>
"""


def _safe_next(value: str | None) -> str:
    """Only a path on this server (no scheme, no host, no //host) may follow a login: no open redirect."""
    if not value:
        return "/"
    parsed = urlparse(value)
    if parsed.scheme or parsed.netloc or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def make_handlers(store, *, secure: bool) -> tuple[type[RequestHandler], type[RequestHandler]]:
    """The login and logout request handlers bound to ``store``."""
    throttle = _Throttle()
    # password checks run on two threads of their own: off the event loop, and a flood of sign-ins costs
    # at most two scrypt computations (CPU and 16 MiB each) at a time
    checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lens-login")

    class LoginHandler(RequestHandler):
        def get(self):
            self._page()

        def _page(self, error: str = "", username: str = "", status: int = 200):
            self.set_status(status)
            self.set_header("Cache-Control", "no-store")
            self.set_header("X-Frame-Options", "DENY")
            self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
            self.write(_PAGE.format(
                action=html.escape(self.request.path), xsrf=self.xsrf_form_html(),
                next=html.escape(_safe_next(self.get_argument("next", "/"))),
                username=html.escape(username),
                error=f'<p class="error" role="alert">{html.escape(error)}</p>' if error else "",
            ))

        async def post(self):  # Tornado has already checked the _xsrf token (xsrf_cookies=True)
            name = self.get_body_argument("username", "").strip()[:64]
            password = self.get_body_argument("password", "")[:1024]
            key = (self.request.remote_ip or "?", name.lower())
            wait = throttle.wait(key)
            if wait > 0:
                return self._page(f"Too many failed attempts; try again in {wait:.0f} s.", name, 429)
            # scrypt takes tens of milliseconds: off the event loop, so other sessions stay responsive
            user = await IOLoop.current().run_in_executor(checks, store.users.authenticate, name, password)
            if user is None:
                throttle.failed(key)
                return self._page("Wrong user name or password.", name, 401)
            throttle.succeeded(key)
            self.set_secure_cookie(COOKIE, user.name, expires_days=COOKIE_DAYS, httponly=True, samesite="Lax",
                                   secure=secure)
            self.redirect(_safe_next(self.get_body_argument("next", "/")))

    class LogoutHandler(RequestHandler):
        def get(self):
            self.clear_cookie(COOKIE)
            self.redirect("." + LOGIN_URL)

    return LoginHandler, LogoutHandler


class LensAuth(AuthProvider):
    """Bokeh auth provider backed by the store's users (see the module docstring)."""

    def __init__(self, store, *, secure_cookies: bool = False):
        self.store = store
        self._login, self._logout = make_handlers(store, secure=secure_cookies)
        self._cache: dict[str, tuple[float, bool]] = {}
        super().__init__()

    def user_allowed(self, name: str) -> bool:
        """Whether ``name`` exists and is enabled (cached a few seconds: every request asks)."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit and now - hit[0] < _USER_CACHE_SECONDS:
            return hit[1]
        allowed = self.store.users.role(name) is not None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (now, allowed)
        return allowed

    @property
    def get_user(self):
        def get_user(handler: RequestHandler) -> Any:
            raw = handler.get_secure_cookie(COOKIE, max_age_days=COOKIE_DAYS)
            if not raw:
                return None
            name = raw.decode("utf-8", "replace")
            return name if self.user_allowed(name) else None

        return get_user

    @property
    def login_url(self) -> str:
        return LOGIN_URL

    @property
    def login_handler(self):
        return self._login

    @property
    def logout_url(self) -> str:
        return LOGOUT_URL

    @property
    def logout_handler(self):
        return self._logout
