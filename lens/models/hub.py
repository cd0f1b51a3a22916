"""Is the Hugging Face Hub reachable, and how does this machine download a model? — asked before loading.

``lens.load("gpt2")`` on a machine without network would otherwise spend ~20 s in the hub client's
retries before failing. lens knows the hub is out of reach when ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is set, or when a TCP connection to the hub's endpoint cannot be opened within
a second and a half (one probe, remembered for a minute); it then loads from the local cache only, and
fails at once with advice when the model is not there. The advice names the download command of the
installed ``huggingface_hub`` (``hf download`` since 0.34, ``huggingface-cli download`` before).

Example::

    offline_reason()               # None, or "HF_HUB_OFFLINE is set", or "no network: …"
    download_command("gpt2")       # "hf download gpt2 --local-dir ./gpt2"
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlparse

__all__ = ["offline_reason", "download_command"]

_TRUE = {"1", "ON", "YES", "TRUE"}
_PROBE_SECONDS = 1.5
_PROBE_MEMORY = 60.0
_probes: dict[tuple[str, int], tuple[float, str | None]] = {}


def _endpoint() -> tuple[str, int]:
    try:
        from huggingface_hub import constants

        url = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except ImportError:  # pragma: no cover - a dependency of transformers
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(url)
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)


def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection opens in time; else the reason. Name resolution has no timeout of its
    own in the socket module, so the whole attempt runs in a daemon thread that is waited for briefly."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_SECONDS):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=attempt, name="lens-hub-probe", daemon=True)
    worker.start()
    worker.join(_PROBE_SECONDS + 0.5)
    if not outcome:
        return f"no answer within {_PROBE_SECONDS:g} s"
    return outcome[0]


def offline_reason() -> str | None:
    """Why the Hugging Face Hub is known to be out of reach, or None when it may be reachable.

    Example: ``offline_reason()`` → ``"HF_HUB_OFFLINE is set"`` in lens's test suite.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name} is set"
    host, port = _endpoint()
    now = time.monotonic()
    cached = _probes.get((host, port))
    if cached is not None and now - cached[0] < _PROBE_MEMORY:
        error = cached[1]
    else:
        error = _probe(host, port)
        _probes[(host, port)] = (now, error)
    return None if error is None else f"no network: {host}:{port} cannot be reached ({error})"


def download_command(name: str) -> str:
    """The shell command that downloads ``name`` into ``./<last part of name>`` with the installed hub client.

    Example: ``download_command("EleutherAI/pythia-160m")`` → ``"hf download EleutherAI/pythia-160m
    --local-dir ./pythia-160m"``.
    """
    folder = f"./{name.rstrip('/').split('/')[-1]}"
    return f"{_cli()} download {name} --local-dir {folder}"


def _cli() -> str:
    """``hf`` when the installed huggingface_hub provides it (0.34 and later; 1.0 removed the old name)."""
    from importlib import metadata

    try:
        scripts = {ep.name for ep in metadata.distribution("huggingface_hub").entry_points
                   if ep.group == "console_scripts"}
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of transformers
        return "hf"
    if "hf" in scripts or "huggingface-cli" not in scripts:
        return "hf"
    return "huggingface-cli"
