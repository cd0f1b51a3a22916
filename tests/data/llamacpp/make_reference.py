"""Regenerate llama.cpp's reference next-token distributions for SmolLM2-135M-Instruct Q4_1.

    .venv/bin/pip install llama-cpp-python==0.3.36     # see below for the build options used here
    .venv/bin/python tests/data/llamacpp/make_reference.py

llama.cpp itself (through llama-cpp-python) evaluates the embedded decoder's GGUF file on a few prompts, every
position's logits kept (``logits_all=True``), with the library's defaults otherwise — in particular the f16 KV
cache and no flash attention. The prompts are tokenized by lens's tokenizer for the model and handed to
llama.cpp as token ids, so both sides see identical inputs (SmolLM2's tokenizer adds no BOS).

What is kept, per prompt position, is llama.cpp's log-softmax distribution coarsened to its top ``K`` tokens
plus one bucket for the rest (``topk_ids`` as uint16, ``topk_logprobs`` float32, ``tail_logprob`` = log of the
remaining mass): the KL divergence between two distributions coarsened the same way is a lower bound of their
full KL (data processing inequality). With K = 2048 the tail holds a median 7·10⁻⁴ of the mass (0.24 at the
most uncertain position) and the coarsened KL is 98% of the full-vocabulary KL on these prompts (4.18 vs
4.27·10⁻³ for the dequantized model; tests/test_llamacpp_live.py measures it wherever llama-cpp-python is
installed). Full-vocabulary fp16 log-probabilities for the 80 positions would take 7.9 MB; these take 1 MB.

For prompt 0 the script also keeps some of llama.cpp's intermediate tensors, read through its graph-evaluation
callback (``cb_eval``) under the names llama.cpp's graph gives them: the output
of a few layers (``l_out-ℓ``, so that a single layer can be fed llama.cpp's own input and compared with its own
output), the final normed hidden states (``result_norm``), and layer 0's attention inputs after RoPE and its
output (``Qcur-0``, ``Kcur-0``, ``Vcur-0``, ``kqv_out-0``) — all float32, under ``t.<name>``. Teacher-forced this
way, a comparison measures one layer's numerics instead of the whole chaotic chain (see tests/test_llamacpp.py).

Written: ``smollm2_q4_1.safetensors`` (arrays, prompt ``i`` under ``p{i}.…``) and ``smollm2_q4_1.json``
(prompts, token ids, llama-cpp-python version, system info, threads and settings, the GGUF file's sha256).
The wheel used here was built from the PyPI sdist with
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
-DLLAMA_BUILD_TOOLS=OFF"`` (a native build died with SIGILL on an AMX CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NAME = "smollm2_q4_1"
TOP_K = 2048
N_THREADS = 2

PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Attention sinks are tokens that receive a large share of attention regardless of meaning.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]

#: llama.cpp's intermediate tensors kept for prompt 0 (the last tensor of that name in its graph)
CAPTURE_LAYERS = (0, 1, 5, 10, 11, 12, 20, 28, 29)
CAPTURE = ("result_norm", "Qcur-0", "Kcur-0", "Vcur-0", "kqv_out-0",
           *(f"l_out-{i}" for i in CAPTURE_LAYERS))

#: llama.cpp settings; everything not listed is llama-cpp-python's default (f16 K and V cache, no flash attention)
SETTINGS = {"n_ctx": 512, "n_batch": 512, "n_ubatch": 512, "n_threads": N_THREADS, "n_threads_batch": N_THREADS,
            "logits_all": True, "seed": 0, "verbose": False}


def prompt_ids(tokenizer) -> list[list[int]]:
    """The token ids both sides evaluate (lens's tokenizer for SmolLM2; no special tokens added)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def _capture_context(llm, names):
    """Give ``llm`` a fresh context whose eval callback copies the float32 tensors called ``names``."""
    import ctypes
    import os

    import llama_cpp
    from llama_cpp._internals import LlamaContext

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data.restype = ctypes.c_void_p
    lib.ggml_get_data.argtypes = [ctypes.c_void_p]
    captured: dict[str, np.ndarray] = {}

    def callback(tensor, ask, _):
        name = lib.ggml_get_name(tensor).decode()
        if ask:
            return name in names
        # struct ggml_tensor: enum ggml_type type; (pad); ggml_backend_buffer * buffer; int64_t ne[4]; ...
        ggml_type = ctypes.c_int.from_address(tensor).value
        ne = list((ctypes.c_int64 * 4).from_address(tensor + 16))
        data = lib.ggml_get_data(tensor)
        if ggml_type == 0 and data:  # GGML_TYPE_F32, in host memory (the CPU backend)
            count = int(np.prod(ne))
            captured[name] = np.frombuffer(ctypes.string_at(data, 4 * count), dtype=np.float32).reshape(ne[::-1]).copy()
        return True

    keep = llama_cpp.ggml_backend_sched_eval_callback(callback)
    params = llm.context_params
    params.cb_eval = keep
    params.cb_eval_user_data = None
    llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)
    llm._capture_callback = keep  # keep the C callback alive as long as the context
    return captured


def llamacpp_logits(gguf_path: str | Path, ids: list[list[int]], capture=()) -> tuple[list[np.ndarray], dict]:
    """llama.cpp's logits [T, V] float32 for each prompt, and a description of the run (with ``capture``:
    ``info["tensors"]`` holds those intermediate tensors of the first prompt)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), **SETTINGS)
    captured = _capture_context(llm, set(capture)) if capture else {}
    out = []
    for i, tokens in enumerate(ids):
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        if i == 0:
            first = dict(captured)
            captured.clear()
    info = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "settings": SETTINGS,
        "defaults": "f16 K and V cache (type_k/type_v unset), flash attention off (llama-cpp-python's flash_attn=False)",
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    if capture:
        missing = set(capture) - set(first)
        if missing:
            raise RuntimeError(f"llama.cpp's graph had no float32 tensors named {sorted(missing)}")
        info["tensors"] = first
    llm.close()
    return out, info


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: next to this script)")
    args = parser.parse_args(argv)

    from safetensors.numpy import save_file

    import lens
    from lens.atomic import atomic_path, atomic_write_text
    from lens.models.embedded import SMOLLM2_FILE, smollm2_gguf_path
    from lens.models.llamacpp import coarsen

    path = smollm2_gguf_path()
    lm = lens.load("smollm2")
    ids = prompt_ids(lm.tokenizer)
    logits, info = llamacpp_logits(path, ids, capture=CAPTURE)
    arrays: dict[str, np.ndarray] = {f"t.{name}": t for name, t in info.pop("tensors").items()}
    for i, (tokens, lg) in enumerate(zip(ids, logits)):
        arrays[f"p{i}.ids"] = np.asarray(tokens, dtype=np.int64)
        assert lg.shape[-1] <= np.iinfo(np.uint16).max + 1, "ids stored as uint16"
        for key, value in coarsen(log_softmax(lg), TOP_K).items():
            arrays[f"p{i}.{key}"] = value.astype({"topk_ids": np.uint16, "topk_logprobs": np.float32}.get(key, value.dtype))
    meta = {
        "what": "llama.cpp's next-token log-probabilities for SmolLM2-135M-Instruct Q4_1, top-k + tail bucket",
        "gguf_file": Path(path).name,
        "gguf_sha256": SMOLLM2_FILE.member_sha256,
        "prompts": PROMPTS,
        "ids": ids,
        "top_k": TOP_K,
        "tensors": {name: list(arrays[f"t.{name}"].shape) for name in CAPTURE},
        "tensor_layout": "ggml's ne reversed (numpy order); Qcur/Kcur after RoPE in llama.cpp's interleaved-pair "
                         "layout of each head (transformers' q/k rows un-permute it), l_out-ℓ = block ℓ's output",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "regenerate": "python tests/data/llamacpp/make_reference.py",
        **info,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / f"{NAME}.safetensors") as tmp:
        save_file(arrays, str(tmp), metadata={"lens": "llama.cpp reference", "gguf_sha256": SMOLLM2_FILE.member_sha256})
    atomic_write_text(args.out / f"{NAME}.json", json.dumps(meta, indent=1) + "\n")
    size = (args.out / f"{NAME}.safetensors").stat().st_size
    print(f"wrote {args.out / NAME}.safetensors ({size / 1e6:.2f} MB) and .json: {len(ids)} prompts, "
          f"{sum(map(len, ids))} positions, llama-cpp-python {info['llama_cpp_python']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
