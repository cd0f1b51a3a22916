"""Low-bit weights: packed codecs, ``QuantLinear``, smoothing and whole-model conversion (pure torch).

One module per concept (definitions: docs/definitions.md "Low-bit formats"):

| module | what it holds |
|---|---|
| ``packing`` | ``PackedWeight`` (the bytes a deployment keeps) and nibble / bit / trit packing |
| ``fp4`` | E2M1, MXFP4, NVFP4 (bit-exact with torchao's reference quantizers) |
| ``integer`` | int8 per-channel, int4 group-wise, NF4 |
| ``ternary`` | BitNet b1.58 ternary |
| ``binary`` | sub-1-bit binary low-rank (NanoQuant-style) |
| ``gguf`` | GGUF / llama.cpp types (Q4_0 … Q8_0, Q2_K … Q6_K): codecs, ``packed_from_gguf``, the matmul |
| ``gguf_legacy`` | the 32-weight block types (and IQ4_NL, llama-quantize's fallback), block by block |
| ``gguf_kquants`` | the 256-weight K-quant super-blocks and llama.cpp's scale searches |
| ``gguf_activations`` | llama.cpp's activation quantization (Q8_0/Q8_1/Q8_K) and integer dot products |
| ``gguf_blocks`` | the ggml type table and the C reference's float32 arithmetic in torch |
| ``registry`` | ``codec_from_meta`` and ``dequantize`` for any packed weight |
| ``config`` | ``QuantConfig``, scheme names and presets, ``codec_for``, ``quantize``, backends |
| ``smoothing`` | SmoothQuant (and its modality-aware variant), activation statistics, ``calibrate`` |
| ``linear`` | ``QuantLinear``, the packed drop-in for ``nn.Linear`` / GPT-2 ``Conv1D`` |
| ``convert`` | choosing a model's linear layers and replacing them (``quantize_model``) |

Everything public is re-exported here, so ``from lens.kernels.lowbit import QuantLinear`` is the one import
users need. Only ``torch`` and the standard library are imported at module level; torchao and gguf (the
optional extra ``lens-interp[quant]``), numpy (for GGUF file bytes) and tqdm are imported inside the
functions that use them.
"""

from .binary import BinaryLowRankCodec
from .config import PRESETS, SCHEMES, QuantConfig, codec_for, quantize, resolve_backend
from .convert import quantize_model
from .gguf import (
    GGUF_BITS_PER_WEIGHT,
    GGUF_FALLBACK_TYPES,
    GGUF_TYPES,
    GGUF_WEIGHT_TYPES,
    LLAMA_QUANTIZE_FALLBACK,
    VEC_DOT_TYPE,
    GGUFCodec,
    dequantize_gguf,
    fallback_type,
    gguf_bytes,
    gguf_linear,
    gguf_select_rows,
    gguf_type_id,
    gguf_type_name,
    packed_from_gguf,
    quantize_activations,
    to_gguf_type,
)
from .fp4 import (
    E2M1_VALUES,
    E2M1Codec,
    MXFP4Codec,
    NVFP4Codec,
    e2m1_decode,
    e2m1_encode,
)
from .integer import NF4_TABLE, Int4Codec, Int8Codec, NF4Codec
from .layers import default_include, select_linear_modules
from .linear import QuantLinear, resident_bytes
from .packing import (
    PackedWeight,
    pack_bits,
    pack_nibbles,
    pack_trits,
    unpack_bits,
    unpack_nibbles,
    unpack_trits,
)
from .registry import codec_from_meta, dequantize
from .smoothing import (
    ActStats,
    calibrate,
    fake_quant_per_token_int8,
    smoothing_factors,
    token_groups,
)
from .ternary import TernaryCodec

__all__ = [
    # formats
    "PackedWeight", "E2M1_VALUES", "NF4_TABLE", "e2m1_encode", "e2m1_decode", "pack_nibbles",
    "unpack_nibbles", "pack_bits", "unpack_bits", "pack_trits", "unpack_trits", "E2M1Codec",
    "MXFP4Codec", "NVFP4Codec", "Int8Codec", "Int4Codec", "NF4Codec", "TernaryCodec",
    "BinaryLowRankCodec", "codec_from_meta", "dequantize",
    # GGUF / llama.cpp
    "GGUF_TYPES", "GGUF_FALLBACK_TYPES", "GGUF_WEIGHT_TYPES", "GGUF_BITS_PER_WEIGHT", "LLAMA_QUANTIZE_FALLBACK",
    "VEC_DOT_TYPE", "GGUFCodec", "gguf_type_name", "gguf_type_id", "to_gguf_type", "fallback_type",
    "packed_from_gguf", "gguf_bytes", "dequantize_gguf", "gguf_select_rows", "gguf_linear", "quantize_activations",
    # configuration, smoothing, modules
    "SCHEMES", "PRESETS", "QuantConfig", "codec_for", "quantize", "resolve_backend",
    "fake_quant_per_token_int8", "smoothing_factors", "ActStats", "calibrate", "token_groups",
    "QuantLinear", "default_include", "select_linear_modules", "quantize_model", "resident_bytes",
]
