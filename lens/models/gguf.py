"""GGUF files (llama.cpp's format) in ``lens.load``: through transformers' GGUF loader, with provenance.

``lens.load("model.gguf")`` (or a folder plus ``gguf_file=``) reads the file with transformers'
``from_pretrained(folder, gguf_file=...)``, which dequantizes every tensor with the ``gguf`` package's
reference ``dequantize`` into an ordinary Hugging Face model; the tokenizer is rebuilt from the file's
metadata the same way. lens adds what an analysis needs to say *which* file it looked at: the file's
sha256 and its quantization type per tensor (``GGUFInfo``, read with ``gguf.GGUFReader``), recorded in
every run's provenance under ``"gguf"``.

Dequantizing a file takes tens of seconds (SmolLM2-135M: ~25–45 s on 2 cores, most of it parsing the
vocabulary twice and converting the tokenizer). With ``cache=True`` the dequantized model is written once as
a ``save_pretrained`` folder keyed by the file's sha256 (``lens.models.cache``) and later loads read that
folder in about a second. The embedded SmolLM2 always uses the cache.

Which files load: every architecture that transformers reads from GGUF *and* lens has a family row for
(``gguf_supported_architectures()``: llama, mistral, qwen2, qwen3, gemma2, gemma3, gpt2 with transformers
5.24); any other raises ``UnsupportedModelError`` before anything is dequantized.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens.atomic import atomic_write_text, sha256_file
from lens.errors import MissingDependencyError, ModelLoadError, UnsupportedModelError
from lens.models.cache import atomic_folder, cache_dir
from lens.models.families import family_for, supported_model_types

__all__ = [
    "GGUFInfo",
    "read_gguf_info",
    "is_gguf_file",
    "gguf_supported_architectures",
    "gguf_model_type",
    "check_gguf_supported",
    "dequantized_folder",
    "cached_dequantized_folder",
    "load_gguf",
    "MANIFEST",
]

#: the file in a dequantized cache folder that records where it came from
MANIFEST = "lens-gguf.json"
_MANIFEST_SCHEMA = "lens.gguf-dequantized/1"

# GGUF's `general.architecture` → transformers' `model_type`, where they differ. transformers applies the
# same renames in `modeling_gguf_pytorch_utils.load_gguf_checkpoint` (and maps llama files named "mistral"
# to mistral); lens needs them *before* loading, to refuse an unsupported file without dequantizing it.
_ARCH_TO_MODEL_TYPE = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "command-r": "cohere",
}


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - a dependency of lens
        raise MissingDependencyError(
            "reading GGUF files needs the gguf package: pip install 'gguf>=0.19' (a dependency of lens-interp)"
        ) from exc
    return gguf


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, as recorded in a run's provenance (``run.provenance["gguf"]``).

    ``sha256``: hex digest of the whole file. ``architecture``: its ``general.architecture`` (llama.cpp's
    name, e.g. ``"llama"``); ``model_type``: the transformers ``model_type`` it loads as. ``file_type``:
    llama.cpp's file type name (``"MOSTLY_Q4_1"``), None when absent. ``tensor_types``: GGML type name per
    tensor, in file order (``{"blk.0.attn_q.weight": "Q4_1", ...}``); ``tensor_elements``: element count per
    tensor. ``size_bytes``: the file's size.

    Example::

        info = read_gguf_info("SmolLM2-135M-Instruct.Q4_1.gguf")
        info.type_counts          # {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}
        info.to_frame("types")    # tensors, elements, share of weights per type
    """

    path: str
    sha256: str
    size_bytes: int
    architecture: str
    model_type: str
    name: str | None
    file_type: str | None
    tensor_types: dict[str, str] = field(repr=False)
    tensor_elements: dict[str, int] = field(repr=False)
    # where each tensor's bytes are: name → (absolute offset in the file, bytes, GGUF shape ne[0..]); lets
    # quant="keep" map a cached file's blocks without parsing its metadata again
    tensor_layout: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def type_counts(self) -> dict[str, int]:
        """Number of tensors per GGML type, most frequent first."""
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def elements_by_type(self) -> dict[str, int]:
        """Number of weights (elements) stored in each GGML type."""
        out: dict[str, int] = {}
        for name, t in self.tensor_types.items():
            out[t] = out.get(t, 0) + int(self.tensor_elements.get(name, 0))
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def quantized_tensors(self) -> dict[str, str]:
        """The tensors stored as quantized blocks (every type except F32, F16, BF16)."""
        return {n: t for n, t in self.tensor_types.items() if t not in ("F32", "F16", "BF16", "F64")}

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: file name, sha256, size, architecture, type counts and per-tensor types."""
        return {
            "file": Path(self.path).name,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "name": self.name,
            "file_type": self.file_type,
            "type_counts": self.type_counts,
            "elements_by_type": self.elements_by_type,
            "tensor_types": dict(self.tensor_types),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, for a cache manifest (``from_dict`` reads it back)."""
        return {**self.describe(), "path": self.path, "tensor_elements": dict(self.tensor_elements),
                "tensor_layout": {k: [int(o), int(n), [int(d) for d in shape]]
                                  for k, (o, n, shape) in self.tensor_layout.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GGUFInfo":
        return cls(
            path=data["path"], sha256=data["sha256"], size_bytes=int(data["size_bytes"]),
            architecture=data["architecture"], model_type=data["model_type"], name=data.get("name"),
            file_type=data.get("file_type"), tensor_types=dict(data["tensor_types"]),
            tensor_elements={k: int(v) for k, v in data.get("tensor_elements", {}).items()},
            tensor_layout={k: (int(o), int(n), tuple(int(d) for d in shape))
                           for k, (o, n, shape) in data.get("tensor_layout", {}).items()},
        )

    def to_frame(self, kind: str = "tensors"):
        """``"tensors"``: one row per tensor (name, type, elements); ``"types"``: one row per GGML type
        (tensors, elements, share of all weights)."""
        import pandas as pd

        if kind == "tensors":
            return pd.DataFrame(
                {"tensor": list(self.tensor_types), "type": list(self.tensor_types.values()),
                 "elements": [self.tensor_elements.get(n, 0) for n in self.tensor_types]}
            )
        if kind == "types":
            elements = self.elements_by_type
            total = max(sum(elements.values()), 1)
            counts = self.type_counts
            return pd.DataFrame(
                {"type": list(elements), "tensors": [counts[t] for t in elements],
                 "elements": list(elements.values()), "share": [v / total for v in elements.values()]}
            )
        raise ValueError(f"kind must be 'tensors' or 'types', not {kind!r}")

    def __repr__(self) -> str:
        types = ", ".join(f"{t}×{n}" for t, n in self.type_counts.items())
        return (
            f"GGUFInfo({Path(self.path).name!r}, {self.architecture}, {self.size_bytes / 1e6:.1f} MB, "
            f"sha256={self.sha256[:12]}…, tensors: {types})"
        )


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is an existing file that starts with GGUF's magic bytes."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"no such GGUF file: {str(path)!r}")
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} is not a file; pass the .gguf file itself, or the folder with gguf_file=")
    if not is_gguf_file(path):
        raise ModelLoadError(
            f"{str(path)!r} does not start with the GGUF magic bytes, so it is not a GGUF file (truncated download, "
            "or another format); fetch it again or point lens at the right file"
        )


def gguf_model_type(architecture: str, name: str | None = None) -> str:
    """The transformers ``model_type`` a GGUF ``general.architecture`` loads as.

    Example: ``gguf_model_type("gemma3")`` → ``"gemma3_text"``; ``gguf_model_type("llama", "mistral")`` →
    ``"mistral"`` (transformers' own rule for llama files named exactly "mistral").
    """
    if architecture == "llama" and name == "mistral":
        return "mistral"
    return _ARCH_TO_MODEL_TYPE.get(architecture, architecture)


def _transformers_gguf_architectures() -> set[str]:
    """GGUF architectures transformers can read (its legacy table and its newer per-architecture path)."""
    archs: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        archs.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - transformers moved it
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        archs.update(GGUF_ARCHS)
    except ImportError:  # pragma: no cover
        pass
    # the legacy table keys some architectures by their transformers name; accept the GGUF spelling too
    inverse = {v: k for k, v in _ARCH_TO_MODEL_TYPE.items()}
    archs.update(inverse[a] for a in list(archs) if a in inverse)
    return archs - {"general", "tokenizer"}  # the legacy table also keys its shared sections


def gguf_supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` names that ``lens.load`` accepts: read by transformers *and* covered by
    a lens family row. Example: ``['gemma2', 'gemma3', 'gpt2', 'llama', 'qwen2', 'qwen3']`` (mistral files
    say ``llama``)."""
    lens_types = set(supported_model_types())
    return sorted(a for a in _transformers_gguf_architectures() if gguf_model_type(a) in lens_types)


def check_gguf_supported(architecture: str, name: str | None = None) -> str:
    """The model type of a GGUF architecture, or ``UnsupportedModelError`` saying which are supported."""
    model_type = gguf_model_type(architecture, name)
    readable = _transformers_gguf_architectures()
    if architecture not in readable and model_type not in readable:
        raise UnsupportedModelError(
            f"transformers cannot read GGUF files of architecture {architecture!r}, so lens cannot either. "
            f"GGUF architectures lens loads: {', '.join(gguf_supported_architectures())}. Convert the original "
            "(safetensors) model instead and lens.load its folder."
        )
    try:
        family_for(model_type)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"this GGUF file is a {architecture!r} model (model_type {model_type!r}), which transformers reads but "
            f"lens has no family row for. GGUF architectures lens loads: {', '.join(gguf_supported_architectures())}. "
            "Describe the architecture with lens.models.families.register_family(Family(...)) to trace it."
        ) from exc
    return model_type


def read_gguf_info(path: str | os.PathLike, *, sha256: str | None = None) -> GGUFInfo:
    """Read a GGUF file's architecture, file type and per-tensor GGML types with ``gguf.GGUFReader``.

    ``sha256``: pass it when already known (else the file is hashed, ~1 s per GB). Raises
    ``ModelLoadError`` for a missing or non-GGUF file. Example: ``read_gguf_info("m.gguf").type_counts``.
    """
    gguf = _require_gguf()
    p = Path(path).expanduser()
    _check_file(p)
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:
        raise ModelLoadError(f"could not read the GGUF file {str(p)!r} ({type(exc).__name__}: {exc}); it may be corrupt") from exc

    def field_value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    architecture = str(field_value("general.architecture") or "")
    if not architecture:
        raise ModelLoadError(f"{str(p)!r} has no general.architecture in its metadata; it is not a model file")
    name = field_value("general.name")
    file_type = field_value("general.file_type")
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(file_type)).name
        except ValueError:
            file_type = str(file_type)
    tensor_types = {t.name: t.tensor_type.name for t in reader.tensors}
    tensor_elements = {t.name: int(t.n_elements) for t in reader.tensors}
    tensor_layout = {t.name: (int(t.data_offset), int(t.n_bytes), tuple(int(d) for d in t.shape.tolist()))
                     for t in reader.tensors}
    return GGUFInfo(
        path=str(p.resolve()), sha256=sha256 or sha256_file(p), size_bytes=p.stat().st_size,
        architecture=architecture, model_type=gguf_model_type(architecture, name), name=name,
        file_type=file_type, tensor_types=tensor_types, tensor_elements=tensor_elements, tensor_layout=tensor_layout,
    )


# -- loading --------------------------------------------------------------------------------------


def _strip_gguf_quantizer(model) -> None:
    """transformers marks a model read from GGUF as "quantized with gguf" even when every weight was
    dequantized to ordinary tensors; that blocks ``save_pretrained`` and says the wrong thing. The weights
    *are* plain tensors, so drop the marker."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _from_transformers(path: Path, info: GGUFInfo, dtype, progress: bool = True):
    """Dequantize ``path`` with transformers' GGUF loader: (model, tokenizer)."""
    import transformers
    from transformers.utils import logging as hf_logging

    quiet = not progress and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return _from_transformers_inner(path, info, dtype)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _from_transformers_inner(path: Path, info: GGUFInfo, dtype):
    import transformers

    family = family_for(info.model_type)
    auto = getattr(transformers, family.auto_class)
    folder, name = str(path.parent), path.name
    kwargs: dict[str, Any] = {"gguf_file": name}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = auto.from_pretrained(folder, attn_implementation="eager", **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as exc:
        raise MissingDependencyError(
            f"transformers' GGUF loader needs a package that is missing ({exc}); pip install 'gguf>=0.19' accelerate"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not load the GGUF file {str(path)!r} ({type(exc).__name__}: {exc}). The file may be "
            "truncated or use a tensor type transformers cannot dequantize."
        ) from exc
    _strip_gguf_quantizer(model)
    return model, tokenizer


def cached_dequantized_folder(sha256: str) -> Path | None:
    """The cache folder holding the dequantized model of the GGUF file with this sha256, if complete."""
    folder = cache_dir() / "gguf-dequantized" / sha256
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if data.get("schema") != _MANIFEST_SCHEMA or data.get("gguf", {}).get("sha256") != sha256:
        return None
    for fname, meta in data.get("files", {}).items():  # sizes are cheap to check on every load
        f = folder / fname
        if not f.is_file() or f.stat().st_size != int(meta["size"]):
            return None
    return folder


def manifest_info(folder: Path) -> GGUFInfo:
    """The ``GGUFInfo`` recorded in a dequantized cache folder."""
    return GGUFInfo.from_dict(json.loads((Path(folder) / MANIFEST).read_text())["gguf"])


def verify_dequantized_folder(folder: Path) -> list[str]:
    """Re-hash every file of a dequantized cache folder; returns the names whose sha256 differs (empty: intact)."""
    data = json.loads((Path(folder) / MANIFEST).read_text())
    return [f for f, meta in data["files"].items() if sha256_file(Path(folder) / f) != meta["sha256"]]


def dequantized_folder(path: str | os.PathLike, *, info: GGUFInfo | None = None, progress: bool = True) -> Path:
    """The ``save_pretrained`` folder (fp32 safetensors + config + tokenizer) of a GGUF file, from the cache
    or written now (atomically, keyed by the file's sha256).

    Example: ``lens.load(dequantized_folder("m.gguf"))`` — what ``lens.load("m.gguf", cache=True)`` does.
    Raises ``ModelLoadError`` / ``UnsupportedModelError`` like ``load_gguf``.
    """
    import torch

    p = Path(path).expanduser()
    _check_file(p)
    sha = info.sha256 if info is not None else sha256_file(p)
    found = cached_dequantized_folder(sha)
    if found is not None:
        return found
    info = info or read_gguf_info(p, sha256=sha)
    check_gguf_supported(info.architecture, info.name)
    if progress:
        print(f"lens: dequantizing {p.name} once into lens's cache (later loads take about a second) …", flush=True)
    started = time.perf_counter()
    model, tokenizer = _from_transformers(p, info, torch.float32, progress)
    target = cache_dir() / "gguf-dequantized" / sha
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir()) if f.is_file()
        }
        manifest = {
            "schema": _MANIFEST_SCHEMA,
            "gguf": info.to_dict(),
            "dtype": "float32",
            "seconds_to_dequantize": round(time.perf_counter() - started, 2),
            "versions": _versions(),
            "files": files,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return target


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for dist in ("transformers", "gguf", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def load_gguf(path: str | os.PathLike, *, dtype=None, device=None, cache: bool | None = None, progress: bool = True):
    """Load a GGUF file into a Hugging Face model: ``(model, tokenizer, GGUFInfo)``.

    The weights are dequantized by transformers' GGUF loader (the ``gguf`` package's reference
    ``dequantize``), so a quantized tensor holds exactly the values llama.cpp's blocks encode. ``cache``:
    None (default) uses the dequantized model in lens's cache when an entry for the file's sha256 exists;
    True also writes the entry when missing; False ignores the cache and dequantizes the file. Raises ``ModelLoadError`` (missing, truncated or non-GGUF file) and
    ``UnsupportedModelError`` (an architecture transformers cannot read or lens has no family row for).

    Example: ``model, tokenizer, info = load_gguf("tiny.gguf")``.
    """
    p = Path(path).expanduser()
    _check_file(p)
    sha = sha256_file(p)
    folder = cached_dequantized_folder(sha) if cache is not False else None
    if folder is None and cache:
        folder = dequantized_folder(p, progress=progress)
    if folder is not None:
        info = manifest_info(folder)
        info = GGUFInfo(**{**info.__dict__, "path": str(p.resolve())})
        model, tokenizer = load_dequantized(folder, info, dtype)
    else:
        info = read_gguf_info(p, sha256=sha)
        check_gguf_supported(info.architecture, info.name)
        model, tokenizer = _from_transformers(p, info, dtype, progress)
    if device is not None:
        model = model.to(device)
    return model, tokenizer, info


def load_dequantized(folder: Path, info: GGUFInfo, dtype):
    """(model, tokenizer) from a dequantized cache folder."""
    import transformers

    family = family_for(info.model_type)
    auto = getattr(transformers, family.auto_class)
    from lens.progress import quiet_libraries

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        with quiet_libraries():  # lens shows its own bars (or none); a cached load takes about a second
            model = auto.from_pretrained(str(folder), attn_implementation="eager", **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(
            f"the cached dequantized model in {str(folder)!r} could not be read ({type(exc).__name__}: {exc}); "
            "delete that folder and load again to rebuild it"
        ) from exc
    return model, tokenizer
