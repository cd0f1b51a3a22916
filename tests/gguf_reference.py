"""An independent numpy re-implementation of llama.cpp's activation quantization and CPU dot products.

Written from ggml's C reference (``quantize_row_q8_0_ref``/``q8_1_ref``/``q8_K_ref`` in ggml-quants.c, the
``block_*`` structs in ggml-common.h and ``ggml_vec_dot_*_generic`` in ggml-cpu/quants.c), block by block
with numpy scalars, sharing no code with ``lens.kernels.lowbit``: the tests compare lens's vectorized torch
emulation against it. Integer sums are exact (Python ints); float sums are float32 in the C order.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def f16(b: np.ndarray, off: int) -> np.float32:
    return F32(np.frombuffer(bytes(b[off:off + 2]), dtype="<f2")[0])


def _roundf(v: np.float32) -> int:
    # C roundf: nearest, halves away from zero.
    t = np.trunc(v)
    frac = v - t  # exact
    if abs(frac) == F32(0.5):
        return int(t + np.sign(v))
    return int(np.rint(v))


def _nearest_int(v: np.float32) -> int:
    return int(np.rint(v))  # ggml's nearest_int: round half to even


# ------------------------------------------------------------------------------------------------
# Activation quantization: returns per-block dicts {d, qs, s | bsums}
# ------------------------------------------------------------------------------------------------


def q8_0_row(x: np.ndarray, with_sum: bool = False) -> list[dict]:
    out = []
    for b in x.astype(np.float32).reshape(-1, 32):
        amax = F32(0)
        for v in b:
            amax = max(amax, abs(v))
        d = F32(amax / F32(127))
        idv = F32(F32(1) / d) if d != 0 else F32(0)
        qs = [_roundf(F32(v * idv)) for v in b]
        blk = {"d": F32(np.float16(d)), "qs": np.array(qs, dtype=np.int64)}
        if with_sum:
            blk["s"] = F32(np.float16(F32(F32(sum(qs)) * d)))
        out.append(blk)
    return out


def q8_1_row(x: np.ndarray) -> list[dict]:
    return q8_0_row(x, with_sum=True)


def q8_k_row(x: np.ndarray) -> list[dict]:
    out = []
    for b in x.astype(np.float32).reshape(-1, 256):
        amax, mx = F32(0), F32(0)
        for v in b:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax == 0:
            out.append({"d": F32(0), "qs": np.zeros(256, np.int64), "bsums": np.zeros(16, np.int64)})
            continue
        iscale = F32(F32(-127) / mx)
        qs = np.array([min(127, _nearest_int(F32(iscale * v))) for v in b], dtype=np.int64)
        out.append({"d": F32(F32(1) / iscale), "qs": qs, "bsums": qs.reshape(16, 16).sum(1)})
    return out


def fake_quant(blocks: list[dict]) -> np.ndarray:
    """The values the activation codes stand for (``q · d``, float32)."""
    return np.concatenate([(b["qs"].astype(np.float32) * b["d"]).astype(np.float32) for b in blocks])


# ------------------------------------------------------------------------------------------------
# Weight block fields, straight from the C structs
# ------------------------------------------------------------------------------------------------


def _nib(qs):
    qs = np.asarray(qs, dtype=np.int64)
    return qs & 0xF, qs >> 4


def _qh_bits(b, off):
    qh = int.from_bytes(bytes(b[off:off + 4]), "little")
    return np.array([(qh >> j) & 1 for j in range(32)], dtype=np.int64)


def _k4_scales(s):
    s = [int(v) for v in s]
    sc, mn = [], []
    for j in range(8):
        if j < 4:
            sc.append(s[j] & 63)
            mn.append(s[j + 4] & 63)
        else:
            sc.append((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4))
            mn.append((s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    return sc, mn


def _k_codes(t, b):
    """Integer codes (ggml's ``aux8``) of one K-quant block, element order."""
    b = np.asarray(b, dtype=np.int64)
    if t == "q2_k":
        qs = b[16:80]
        return np.array([(qs[h * 32 + l] >> (2 * k)) & 3 for h in range(2) for k in range(4) for l in range(32)])
    if t == "q3_k":
        hm, qs = b[0:32], b[32:96]
        out = []
        for h in range(2):
            for k in range(4):
                m = 1 << (4 * h + k)
                out += [((qs[h * 32 + l] >> (2 * k)) & 3) - (0 if hm[l] & m else 4) for l in range(32)]
        return np.array(out)
    if t == "q4_k":
        qs = b[16:144]
        return np.array([(qs[g * 32 + l] >> (4 * s)) & 0xF for g in range(4) for s in range(2) for l in range(32)])
    if t == "q5_k":
        qh, qs = b[16:48], b[48:176]
        return np.array([((qs[g * 32 + l] >> (4 * s)) & 0xF) + (16 if qh[l] & (1 << (2 * g + s)) else 0)
                         for g in range(4) for s in range(2) for l in range(32)])
    if t == "q6_k":
        ql, qh = b[0:128], b[128:192]
        out = np.zeros(256, dtype=np.int64)
        for h in range(2):
            for l in range(32):
                q = ql[h * 64:(h + 1) * 64]
                hh = qh[h * 32 + l]
                out[h * 128 + l] = ((q[l] & 0xF) | (((hh >> 0) & 3) << 4)) - 32
                out[h * 128 + l + 32] = ((q[l + 32] & 0xF) | (((hh >> 2) & 3) << 4)) - 32
                out[h * 128 + l + 64] = ((q[l] >> 4) | (((hh >> 4) & 3) << 4)) - 32
                out[h * 128 + l + 96] = ((q[l + 32] >> 4) | (((hh >> 6) & 3) << 4)) - 32
        return out
    raise ValueError(t)


def _q3_scales(s):
    s = [int(v) for v in s]
    out = []
    for j in range(16):
        lo = (s[j] & 0xF) if j < 8 else (s[j - 8] >> 4)
        hi = (s[8 + j % 4] >> (2 * (j // 4))) & 3
        out.append((lo | (hi << 4)) - 32)
    return out


IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "iq4_nl": 18,
               "q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def vec_dot(t: str, row_bytes: np.ndarray, x: np.ndarray) -> float:
    """ggml's CPU dot product of one weight row (its GGUF block bytes) with the float activation row ``x``:
    quantize ``x`` to the vec_dot type, then ``ggml_vec_dot_<t>_q8_*_generic``."""
    blocks = np.asarray(row_bytes, dtype=np.uint8).reshape(-1, BLOCK_BYTES[t])
    sumf = F32(0)
    if t in ("q4_0", "q5_0", "q8_0", "iq4_nl", "q4_1", "q5_1"):
        ys = q8_1_row(x) if t in ("q4_1", "q5_1") else q8_0_row(x)
        for b, y in zip(blocks, ys):
            yq = y["qs"]
            if t == "q8_0":
                v = np.frombuffer(bytes(b[2:34]), dtype=np.int8).astype(np.int64)
            elif t in ("q4_0", "iq4_nl"):
                lo, hi = _nib(b[2:18])
                v = np.concatenate([lo, hi])
                v = np.array([IQ4NL[i] for i in v]) if t == "iq4_nl" else v - 8
            elif t == "q4_1":
                lo, hi = _nib(b[4:20])
                v = np.concatenate([lo, hi])
            else:
                off = 2 if t == "q5_0" else 4
                lo, hi = _nib(b[off + 4:off + 20])
                v = np.concatenate([lo, hi]) | (_qh_bits(b, off) << 4)
                v = v - 16 if t == "q5_0" else v
            sumi = int((v * yq).sum())
            dx = f16(b, 0)
            if t in ("q4_1", "q5_1"):
                sumf = F32(sumf + F32(F32(F32(dx * y["d"]) * F32(sumi)) + F32(f16(b, 2) * y["s"])))
            elif t == "q4_0":
                sumf = F32(sumf + F32(F32(F32(sumi) * dx) * y["d"]))
            elif t == "q8_0":
                sumf = F32(sumf + F32(F32(sumi) * F32(dx * y["d"])))
            else:  # q5_0, iq4_nl: (d_x · d_y) · sumi
                sumf = F32(sumf + F32(F32(dx * y["d"]) * F32(sumi)))
        return float(sumf)
    ys = q8_k_row(x)
    for b, y in zip(blocks, ys):
        a, q8 = _k_codes(t, b), y["qs"]
        if t == "q2_k":
            sc = [int(v) for v in b[0:16]]
            summs = sum(int(y["bsums"][j]) * (sc[j] >> 4) for j in range(16))
            isum = sum((sc[j] & 0xF) * int((a[16 * j:16 * j + 16] * q8[16 * j:16 * j + 16]).sum())
                       for j in range(16))
            dall, dmin = F32(y["d"] * f16(b, 80)), F32(y["d"] * f16(b, 82))
            sumf = F32(sumf + F32(F32(dall * F32(isum)) - F32(dmin * F32(summs))))
            continue
        if t in ("q4_k", "q5_k"):
            sc, mn = _k4_scales(b[4:16])
            isum = sum(sc[j] * int((a[32 * j:32 * j + 32] * q8[32 * j:32 * j + 32]).sum()) for j in range(8))
            summ = sum(int(y["bsums"][j]) * mn[j // 2] for j in range(16))
            d, dmin = F32(f16(b, 0) * y["d"]), F32(f16(b, 2) * y["d"])
            sumf = F32(F32(sumf + F32(d * F32(isum))) - F32(dmin * F32(summ)))
            continue
        scales = _q3_scales(b[96:108]) if t == "q3_k" else \
            [int(v) for v in np.frombuffer(bytes(b[192:208]), dtype=np.int8)]
        dx = f16(b, 108 if t == "q3_k" else 208)
        isum = sum(scales[j] * int((a[16 * j:16 * j + 16] * q8[16 * j:16 * j + 16]).sum()) for j in range(16))
        sumf = F32(sumf + F32(F32(dx * y["d"]) * F32(isum)))
    return float(sumf)


def abs_terms(t: str, row_values: np.ndarray, x: np.ndarray) -> float:
    """Σ |w_i · x_i| — the scale against which summation-order differences are judged."""
    return float(np.abs(row_values.astype(np.float64) * x.astype(np.float64)).sum())
