"""Users and roles of a store, with scrypt-hashed passwords (``hashlib.scrypt``; never plaintext).

A password is stored as ``scrypt$N$r$p$<salt>$<hash>`` (base64, 16-byte salt, 32-byte hash, N = 2¹⁴,
r = 8, p = 1: Percival's interactive-login parameters, ≈ 16 MiB and tens of milliseconds per check).
Checking a password compares in constant time, and an unknown or disabled user costs the same scrypt as a
known one, so response times do not tell which names exist. The parameters travel with each hash, so
they can be raised later without invalidating old hashes.

Roles: ``member`` (reads every entry, runs jobs, deletes their own entries) and ``admin`` (also deletes
anyone's entries, starts scans, sees the admin page).

Example::

    store.users.add("ana", "a long passphrase", role="admin")
    store.users.authenticate("ana", "a long passphrase")     # → User(name='ana', role='admin')
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from lens.errors import ConfigError, NotFoundError, StoreError
from lens.store import schema
from lens.store.db import Index

__all__ = ["Users", "User", "hash_password", "check_password", "ROLES", "MIN_PASSWORD"]

ROLES = ("member", "admin")
MIN_PASSWORD = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_N, _R, _P = 2**14, 8, 1
_DUMMY = None  # a hash to check against when the user does not exist (same cost)


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """The storable scrypt hash of ``password``. Example: ``hash_password("secret pass")[:9]`` → ``'scrypt$16'``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(digest)}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a :func:`hash_password` string), in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        n, r, p = int(n), int(r), int(p)
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=n, r=r, p=p,
                             maxmem=256 * n * r, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True)
class User:
    """A user of the store: ``name``, ``role`` (``member``/``admin``), ``created`` (UNIX s), ``disabled``."""

    name: str
    role: str
    created: float
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" and not self.disabled


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"user names are 1–64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit; got {name!r}"
        )
    return name


def _check_password_strength(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ConfigError(f"a password needs at least {MIN_PASSWORD} characters")


class Users:
    """The users table of a store (``store.users``)."""

    def __init__(self, index: Index):
        self.index = index

    def add(self, name: str, password: str, *, role: str = "member") -> User:
        """Create a user; ``ConfigError`` for a bad name, short password or unknown role, ``StoreError`` if
        the name is taken. Example: ``store.users.add("bo", "correct horse battery", role="member")``."""
        check_name(name)
        _check_password_strength(password)
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}; got {role!r}")
        hashed = hash_password(password)
        u = schema.users
        with self.index.write() as conn:
            if conn.execute(sa.select(u.c.name).where(u.c.name == name)).first():
                raise StoreError(f"the user {name!r} exists already; change the password with `lens serve passwd {name}` "
                                 "(or store.users.set_password)")
            conn.execute(u.insert().values(name=name, password=hashed, role=role, created=time.time(), disabled=False))
        return self.get(name)

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password (the old hash is overwritten)."""
        _check_password_strength(password)
        self._update(name, password=hash_password(password))

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}; got {role!r}")
        self._update(name, role=role)

    def disable(self, name: str, disabled: bool = True) -> None:
        """Disable (or re-enable) a user: a disabled user cannot log in; their entries stay."""
        self._update(name, disabled=disabled)

    def _update(self, name: str, **values) -> None:
        u = schema.users
        with self.index.write() as conn:
            if not conn.execute(u.update().where(u.c.name == name).values(**values)).rowcount:
                raise NotFoundError(f"there is no user {name!r}; add one with lens serve adduser {name}")

    def get(self, name: str) -> User:
        u = schema.users
        with self.index.read() as conn:
            row = conn.execute(sa.select(u.c.name, u.c.role, u.c.created, u.c.disabled).where(u.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"there is no user {name!r}")
        return User(row.name, row.role, float(row.created), bool(row.disabled))

    def role(self, name: str) -> str | None:
        """The user's role, or None for an unknown or disabled user."""
        try:
            user = self.get(name)
        except NotFoundError:
            return None
        return None if user.disabled else user.role

    def list(self) -> list[User]:
        u = schema.users
        with self.index.read() as conn:
            rows = conn.execute(sa.select(u.c.name, u.c.role, u.c.created, u.c.disabled).order_by(u.c.name)).all()
        return [User(r.name, r.role, float(r.created), bool(r.disabled)) for r in rows]

    def count(self) -> int:
        with self.index.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(schema.users)).scalar())

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs and they are enabled, else None (same cost either way)."""
        global _DUMMY
        u = schema.users
        row = None
        if isinstance(name, str) and _NAME.fullmatch(name) and isinstance(password, str):
            with self.index.read() as conn:
                row = conn.execute(sa.select(u).where(u.c.name == name)).first()
        if row is None or row.disabled:
            if _DUMMY is None:
                _DUMMY = hash_password(secrets.token_hex(8))
            check_password(password if isinstance(password, str) else "", _DUMMY)
            return None
        if not check_password(password, row.password):
            return None
        return User(row.name, row.role, float(row.created), bool(row.disabled))
