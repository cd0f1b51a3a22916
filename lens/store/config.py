"""The dashboard's configuration: store, server, limits and models — one TOML file, command-line overrides.

Example ``lens-serve.toml`` (every key optional; the values shown are the defaults)::

    [store]
    path = "lens-store"          # the store directory
    index = ""                   # "" → SQLite inside the store; or "postgresql://user:password@host/db"

    [server]
    address = "127.0.0.1"        # anything beyond loopback requires auth
    port = 5006
    auth = true                  # false only on a loopback address (a single user's own machine)
    allow_websocket_origin = []  # extra "host:port" origins, e.g. the reverse proxy's public name
    root_path = ""               # URL prefix when a reverse proxy serves lens under a path
    workers = 2                  # worker processes on this host; 0: the web process only
    worker_threads = 1           # torch threads per worker process
    secure_cookies = false       # true behind TLS: cookies only travel over https
    oauth_provider = ""          # sign in through Panel's OAuth instead: "github", "gitlab", "google", "azure",
                                 # "okta", "auth0", "generic" (see docs/serve.md); users must exist in the store
    oauth_key = ""               # the OAuth client id
    oauth_secret = ""            # the client secret (better: the environment variable LENS_OAUTH_SECRET)
    oauth_redirect_uri = ""      # e.g. "https://lens.example.org" (what the provider redirects back to)
    oauth_extra_params = {}      # provider specifics, e.g. {TOKEN_URL = "…", AUTHORIZE_URL = "…", USER_URL = "…"}

    [limits]
    tokens_per_input = 512       # checked with the model's tokenizer by the worker
    chars_per_input = 20000      # checked by the web process before queueing
    inputs_per_job = 64
    upload_bytes = 2000000       # an uploaded text file
    image_bytes = 5000000        # an uploaded image
    image_pixels = 16000000      # width × height
    jobs_per_user = 4            # queued + running
    running_per_user = 1         # running at once
    job_timeout = 600            # seconds; the job fails, the worker is replaced
    corpus_documents = 5000      # admins' scans over an uploaded corpus
    corpus_bytes = 20000000

    [[models]]
    name = "minilm"              # what users pick; also the job's model key
    source = "embedded"          # "embedded" (all-MiniLM-L6-v2), a folder, a hub id, or "smollm2"
    label = "all-MiniLM-L6-v2 (embedded)"
    quant = ["none"]             # the variants each worker loads once: "none", "int8", "nvfp4", …
    attention = ["dense", "streaming", "sparse"]   # kernels chosen per job on the loaded model

Example::

    config = ServeConfig.load("lens-serve.toml", port=8080)
    config.models[0].name, config.limits.tokens_per_input
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens.errors import ConfigError

__all__ = ["ServeConfig", "ModelSpec", "Limits", "ATTENTION_CHOICES", "is_loopback"]

ATTENTION_CHOICES = ("dense", "streaming", "sparse")


@dataclass(frozen=True)
class ModelSpec:
    """A model the workers load (each ``quant`` variant once) and users can run."""

    name: str
    source: str = "embedded"
    label: str = ""
    quant: tuple[str, ...] = ("none",)
    attention: tuple[str, ...] = ATTENTION_CHOICES

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"a model name is letters, digits, '-', '_' or '.'; got {self.name!r}")
        for choice in self.attention:
            if choice not in ATTENTION_CHOICES:
                raise ConfigError(f"model {self.name}: attention must be among {ATTENTION_CHOICES}; got {choice!r}")
        if not self.quant:
            raise ConfigError(f"model {self.name}: quant needs at least one variant (\"none\" for full precision)")

    @property
    def title(self) -> str:
        return self.label or (f"{self.name} (all-MiniLM-L6-v2, embedded)" if self.source == "embedded" else self.name)


@dataclass(frozen=True)
class Limits:
    """Input and concurrency limits (see the module docstring for their meaning and defaults)."""

    tokens_per_input: int = 512
    chars_per_input: int = 20_000
    inputs_per_job: int = 64
    upload_bytes: int = 2_000_000
    image_bytes: int = 5_000_000
    image_pixels: int = 16_000_000
    jobs_per_user: int = 4
    running_per_user: int = 1
    job_timeout: float = 600.0
    corpus_documents: int = 5_000
    corpus_bytes: int = 20_000_000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"limits.{f.name} must be a positive number; got {value!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``lens serve`` needs. Build it with :meth:`load` (a TOML file + overrides)."""

    store: Path = Path("lens-store")
    index: str = ""
    address: str = "127.0.0.1"
    port: int = 5006
    auth: bool = True
    allow_websocket_origin: tuple[str, ...] = ()
    root_path: str = ""
    workers: int = 2
    worker_threads: int = 1
    secure_cookies: bool = False
    oauth_provider: str = ""
    oauth_key: str = ""
    oauth_secret: str = ""
    oauth_redirect_uri: str = ""
    oauth_extra_params: dict = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    models: tuple[ModelSpec, ...] = (ModelSpec("minilm"),)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> "ServeConfig":
        """Read ``path`` (TOML; None: defaults only) and apply ``overrides`` (None values are ignored).

        Raises ``ConfigError`` naming the key for unknown keys and wrong types.
        Example: ``ServeConfig.load("lens-serve.toml", port=8080, store="/srv/lens")``.
        """
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            try:
                import tomllib
            except ImportError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise ConfigError(f"there is no configuration file {str(path)!r}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, base=path.parent if path is not None else Path.cwd(), source=path, **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base: Path | None = None, source: Path | None = None,
                  **overrides: Any) -> "ServeConfig":
        """Build from the nested dict of a TOML file (relative store paths resolve against ``base``)."""
        unknown = set(data) - {"store", "server", "limits", "models"}
        if unknown:
            raise ConfigError(f"unknown section(s) {sorted(unknown)} in {source}; sections: store, server, limits, models")
        kwargs: dict[str, Any] = {}
        store = dict(data.get("store", {}))
        _only(store, {"path", "index"}, "store")
        if store.get("path"):
            kwargs["store"] = ((base or Path.cwd()) / Path(store["path"]).expanduser()).resolve()
        if store.get("index"):
            kwargs["index"] = str(store["index"])
        server = dict(data.get("server", {}))
        _only(server, {"address", "port", "auth", "allow_websocket_origin", "workers", "worker_threads",
                       "secure_cookies", "oauth_provider", "oauth_key", "oauth_secret", "oauth_redirect_uri",
                       "oauth_extra_params"}, "server")
        for key, value in server.items():
            kwargs[key] = tuple(value) if key == "allow_websocket_origin" else value
        limits = dict(data.get("limits", {}))
        _only(limits, {f.name for f in dataclasses.fields(Limits)}, "limits")
        kwargs["limits"] = Limits(**limits)
        if "models" in data:
            models = []
            for item in data["models"]:
                item = dict(item)
                _only(item, {f.name for f in dataclasses.fields(ModelSpec)}, "models")
                for key in ("quant", "attention"):
                    if key in item:
                        item[key] = tuple([item[key]] if isinstance(item[key], str) else item[key])
                models.append(ModelSpec(**item))
            names = [m.name for m in models]
            if len(set(names)) != len(names):
                raise ConfigError(f"model names must be distinct; got {names}")
            kwargs["models"] = tuple(models)
        for key, value in overrides.items():
            if value is not None:
                kwargs[key] = Path(value).expanduser().resolve() if key == "store" else value
        config = cls(source=source, **kwargs)
        config._check()
        return config

    def _check(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be 0–65535; got {self.port!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"server.workers must be an integer ≥ 0; got {self.workers!r}")
        if not self.models:
            raise ConfigError("configure at least one model ([[models]] in the configuration file)")
        if self.oauth_provider and not (self.oauth_key and (self.oauth_secret or os.environ.get("LENS_OAUTH_SECRET"))):
            raise ConfigError(
                f"server.oauth_provider = {self.oauth_provider!r} needs server.oauth_key and the client secret "
                "(server.oauth_secret, or better the environment variable LENS_OAUTH_SECRET)"
            )

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ConfigError(f"there is no model {name!r} configured; configured: {', '.join(m.name for m in self.models)}")

    @property
    def index_url(self) -> str:
        return self.index or f"sqlite:///{Path(self.store).resolve() / 'index.sqlite'}"

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)

    def to_toml_dict(self) -> dict[str, Any]:
        """The configuration as the nested dict of a TOML file (for the admin page and the workers)."""
        return {
            "store": {"path": str(self.store), "index": self.index},
            "server": {"address": self.address, "port": self.port, "auth": self.auth,
                       "allow_websocket_origin": list(self.allow_websocket_origin), "root_path": self.root_path,
                       "workers": self.workers, "worker_threads": self.worker_threads,
                       "secure_cookies": self.secure_cookies},  # the OAuth client secret stays with the web process
            "limits": dataclasses.asdict(self.limits),
            "models": [{**dataclasses.asdict(m), "quant": list(m.quant), "attention": list(m.attention)} for m in self.models],
        }


def _only(section: dict, allowed: set[str], name: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{name}]; allowed: {', '.join(sorted(allowed))}")


def is_loopback(address: str) -> bool:
    """Whether ``address`` only accepts connections from this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if address in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface
