"""Test data and locators shared by the GGUF test files: random block bytes and weights with planted edge
cases, bit-level comparison, the ctypes bindings to libggml (llama.cpp's C, from llama-cpp-python) and the
path of the embedded SmolLM2 GGUF."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lens.kernels.lowbit import GGUF_WEIGHT_TYPES

T = {t: GGMLQuantizationType[t.upper()] for t in GGUF_WEIGHT_TYPES}
# Byte offsets of each block's fp16 scale fields (ggml-common.h block_* structs).
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "iq4_nl": (0,),
              "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
GGUF_HAS_QUANTIZE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_blocks(t: str, rows: int, cols: int, seed: int, finite: bool = True) -> np.ndarray:
    """Random block bytes; with ``finite`` the fp16 scales are random finite values of either sign."""
    bs, ts = GGML_QUANT_SIZES[T[t]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // bs, ts), dtype=np.uint8)
    if finite:
        for off in F16_FIELDS[t]:
            v = (rng.standard_normal(len(raw)) * rng.choice([1e-4, 1e-2, 1.0], len(raw))).astype(np.float16)
            raw[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // bs * ts)


def tricky_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian and heavy-tailed rows with planted edge cases: zero blocks, a constant row, −0.0, exact
    ties of the rounding grids, a single outlier, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1::3] *= torch.exp(torch.randn(len(w[1::3]), cols, generator=g))
    w[0, :64] = 0.0
    w[2, :] = 0.75                                        # constant row (max == min blocks)
    w[3, :32] = -0.0
    w[4, :32] = torch.arange(32) - 15.5                   # halves after scaling
    w[5, 7] = 40.0                                        # one outlier
    w[6] *= 1e-6
    w[7] *= 1e4
    if cols >= 512:
        w[8, 256:512] = 0.0                                # a whole zero super-block
    return w


def libggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed: the libggml cross-check runs where it is")
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    return base, cpu


class CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


ACT_TYPES = {"q8_0": (32, 34, 8), "q8_1": (32, 36, 9), "q8_k": (256, 292, 15)}


def c_quantize(base, name, x, block_bytes, block):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // block * block_bytes, dtype=np.uint8)
    f = getattr(base, name)
    f.restype, f.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    f(x.ctypes.data, out.ctypes.data, x.size)
    return out


def smollm2_gguf_path() -> Path:
    """The embedded SmolLM2 Q4_1 GGUF: ``$LENS_SMOLLM2_GGUF`` if set, else lens's cache through
    ``lens.models.embedded.smollm2_gguf_path(fetch=False)`` (the model side's locator), else the same cache
    layout (``$LENS_CACHE`` / ``$XDG_CACHE_HOME/lens`` / ``~/.cache/lens``, ``embedded/smollm2/``). Missing →
    the test FAILS, naming the command that fetches it."""
    env = os.environ.get("LENS_SMOLLM2_GGUF")
    if env:
        path = Path(env).expanduser()
    else:
        try:
            from lens.models.embedded import smollm2_gguf_path as locate
        except ImportError:
            locate = None
        if locate is not None:
            from lens.errors import LensError
            try:
                return Path(locate(fetch=False))
            except LensError as exc:
                pytest.fail(f"{exc}", pytrace=False)
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = Path(os.environ.get("LENS_CACHE") or (Path(xdg) if xdg else Path.home() / ".cache") / "lens")
        path = cache.expanduser() / "embedded" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"the embedded SmolLM2 GGUF is not at {path}: run `lens models fetch smollm2` "
                    "(or set LENS_SMOLLM2_GGUF to the file)", pytrace=False)
    return path
