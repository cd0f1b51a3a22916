"""``lens serve`` over HTTP, against the session's real server: sign-in with XSRF protection, signed cookies,
no open redirect, the admin status endpoint, the web process holding no model; and the refusals before
listening (beyond loopback without auth, no users)."""

from __future__ import annotations

import http.cookiejar
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

import lens.store
from serve_support import free_port

pytestmark = pytest.mark.slow


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def client():
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)
    return opener, jar


def fetch(opener, url, data=None):
    try:
        with opener.open(url, data=urllib.parse.urlencode(data).encode() if data is not None else None, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def sign_in(server, name, password, next_="/"):
    opener, jar = client()
    status, _, page = fetch(opener, f"{server.url}/login")
    assert status == 200
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page).group(1)
    status, headers, body = fetch(opener, f"{server.url}/login",
                                  {"_xsrf": xsrf, "username": name, "password": password, "next": next_})
    return opener, jar, status, headers, body


def test_nothing_is_served_before_sign_in(team_server):
    opener, _ = client()
    status, headers, _ = fetch(opener, f"{team_server.url}/")
    assert status == 302 and headers["Location"].startswith("./login")
    status, _, body = fetch(opener, f"{team_server.url}/api/status")
    assert status == 403 and "admin" in body
    status, _, _ = fetch(opener, f"{team_server.url}/ws")
    assert status in (401, 403, 302)
    assert fetch(opener, f"{team_server.url}/liveness")[0] == 200


def test_sign_in_needs_the_xsrf_token_and_the_right_password(team_server):
    opener, jar = client()
    status, _, _ = fetch(opener, f"{team_server.url}/login", {"username": "ana", "password": team_server.passwords["ana"]})
    assert status == 403  # no _xsrf: refused before the password is even looked at
    _, jar, status, _, body = sign_in(team_server, "ana", "not her password")
    assert status == 401 and "Wrong user name or password" in body and not any(c.name == "user" for c in jar)
    _, jar, status, _, body = sign_in(team_server, "nobody", "whatever-password")
    assert status == 401 and "Wrong user name or password" in body
    opener, jar, status, headers, _ = sign_in(team_server, "ana", team_server.passwords["ana"], next_="//evil.example/x")
    assert status == 302 and headers["Location"] == "/"  # no open redirect
    cookie = next(c for c in jar if c.name == "user")
    assert cookie.has_nonstandard_attr("HttpOnly") and "ana" != cookie.value  # signed, not the bare name
    status, _, page = fetch(opener, f"{team_server.url}/")
    assert status == 200 and "bokeh" in page.lower()


def test_a_forged_cookie_is_not_a_session(team_server):
    opener, jar = client()
    forged = http.cookiejar.Cookie(0, "user", "ana", None, False, "127.0.0.1", False, False, "/", True, False, None,
                                   False, None, None, {})
    jar.set_cookie(forged)
    status, headers, _ = fetch(opener, f"{team_server.url}/")
    assert status == 302 and "login" in headers["Location"]


def test_the_web_process_holds_no_model(team_server):
    opener, *_ = sign_in(team_server, "bo", team_server.passwords["bo"])
    assert fetch(opener, f"{team_server.url}/api/status")[0] == 403  # members do not see it
    opener, *_ = sign_in(team_server, "ana", team_server.passwords["ana"])
    status, _, body = fetch(opener, f"{team_server.url}/api/status?deep=1")
    assert status == 200
    facts = json.loads(body)
    web = facts["web"]
    assert web["transformers_modeling_modules"] == [] and not web["lens_models_module_loaded"]
    assert web["torch_modules_with_parameters"] == 0 and web["parameters"] == 0 and web["lens_models"] == 0
    (worker,) = facts["workers"]
    assert worker["models"] == ["minilm"] and worker["pid"] != web["pid"]
    # the worker holds MiniLM twice (fp32 + int8) on top of the same libraries; the web process holds none
    assert web["rss_bytes"] < 700e6, web["rss_bytes"]
    # lens serve restarted itself (same pid) with an allocator that gives memory back; its workers did not
    assert web["pid"] == team_server.proc.pid

    def environ(pid):
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)

    assert environ(web["pid"]).get(b"PYTHONMALLOC") == b"malloc"
    assert environ(web["pid"]).get(b"MALLOC_ARENA_MAX") == b"2"
    assert b"PYTHONMALLOC" not in environ(worker["pid"]) and b"MALLOC_ARENA_MAX" not in environ(worker["pid"])
    assert web["allocator"]["malloc_in_use"] > 50e6  # Python's objects now live in malloc's heap


def _refused(tmp_path, *args):
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "lens", "serve", "--store", str(tmp_path), "--port", str(port),
                          "--workers", "0", *args], capture_output=True, text=True, timeout=120)
    with socket.socket() as sock:
        listening = sock.connect_ex(("127.0.0.1", port)) == 0
    return out, listening


def test_beyond_loopback_without_auth_it_refuses_to_start(tmp_path):
    out, listening = _refused(tmp_path / "s1", "--address", "0.0.0.0", "--no-auth")
    assert out.returncode == 2 and not listening
    assert "refusing to listen on 0.0.0.0 without auth" in out.stderr
    out, listening = _refused(tmp_path / "s3")  # auth on (the default) but nobody could sign in
    assert out.returncode == 2 and not listening and "no users" in out.stderr and "adduser" in out.stderr


@pytest.mark.parametrize("address,allowed", [("0.0.0.0", False), ("::", False), ("192.168.1.7", False),
                                             ("lens.example.org", False), ("127.0.0.1", True), ("127.0.0.2", True),
                                             ("::1", True), ("localhost", True)])
def test_only_loopback_may_go_without_auth(address, allowed, tmp_path):
    from lens.errors import ConfigError
    from lens.store.config import ServeConfig
    from lens.widgets.app import check_listen_policy

    store = lens.store.open(tmp_path)
    config = ServeConfig.load(None, store=tmp_path, address=address, auth=False)
    if allowed:
        check_listen_policy(config, store)
    else:
        with pytest.raises(ConfigError, match="without auth"):
            check_listen_policy(config, store)


def test_adduser_and_passwd_from_the_command_line(tmp_path, monkeypatch, capsys):
    import io

    from lens.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("cy's password\n"))
    assert main(["serve", "adduser", "cy", "--admin", "--password-stdin", "--store", str(tmp_path)]) == 0
    store = lens.store.open(tmp_path)
    assert store.users.authenticate("cy", "cy's password").is_admin
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["serve", "adduser", "dee", "--password-stdin", "--store", str(tmp_path)]) == 2
    assert "8 characters" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("a brand new password\n"))
    assert main(["serve", "passwd", "cy", "--password-stdin", "--store", str(tmp_path)]) == 0
    assert store.users.authenticate("cy", "a brand new password") and not store.users.authenticate("cy", "cy's password")


def test_single_sign_on_through_panels_oauth_hands_over_to_the_provider(tmp_path):
    """With server.oauth_provider, lens's login is replaced by Panel's OAuth flow (here GitHub's; nothing is
    contacted: the test only follows the first redirect), and the store still decides who gets a dashboard."""
    from lens.cli import main

    store = lens.store.open(tmp_path / "store")
    assert main(["serve", "adduser", "octocat", "--oauth", "--store", str(tmp_path / "store")]) == 0
    assert store.users.get("octocat").role == "member"
    config = tmp_path / "oauth.toml"
    config.write_text('[store]\npath = "store"\n\n[server]\nworkers = 0\noauth_provider = "github"\n'
                      'oauth_key = "lens-test-client"\noauth_redirect_uri = "http://127.0.0.1/"\n')
    from serve_support import lens_server

    port = free_port()
    with lens_server(config, port=port, env={"LENS_OAUTH_SECRET": "not-a-real-secret"}) as (url, proc):
        opener, _ = client()
        status, headers, _ = fetch(opener, f"{url}/")
        assert status == 302 and "login" in headers["Location"]
        status, headers, _ = fetch(opener, f"{url}/login")
        assert status == 302 and headers["Location"].startswith("https://github.com/login/oauth/authorize")
        assert "client_id=lens-test-client" in headers["Location"]
        assert fetch(opener, f"{url}/api/status")[0] == 403
    out = subprocess.run([sys.executable, "-m", "lens", "serve", "--config", str(config), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, env={k: v for k, v in __import__("os").environ.items()
                                                                             if k != "LENS_OAUTH_SECRET"})
    assert out.returncode == 2 and "LENS_OAUTH_SECRET" in out.stderr  # no client secret: refused
