"""GGUF K-quants — Q2_K, Q3_K, Q4_K, Q5_K, Q6_K — super-block by super-block (pure torch).

A super-block holds 256 consecutive weights of one row, split into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or
32 (Q4_K, Q5_K) with their own integer scales, themselves scaled by the super-block's fp16 ``d`` (and, for
the types with a minimum, ``dmin``):

======  =====  =========================================================================  ===================
type    bytes  layout (little-endian)                                                     weight ``j`` of
                                                                                          sub-block ``s``
======  =====  =========================================================================  ===================
Q2_K    84     16 B scales (low nibble sc, high m) · 64 B 2-bit q · fp16 d · fp16 dmin    ``d·sc·q − dmin·m``
Q3_K    110    32 B hmask (3rd bit) · 64 B 2-bit low q · 12 B 6-bit scales · fp16 d       ``d·(sc − 32)·(q − 4)``
Q4_K    144    fp16 d · fp16 dmin · 12 B 6-bit sc/m (8 each) · 128 B nibbles              ``d·sc·q − dmin·m``
Q5_K    176    fp16 d · fp16 dmin · 12 B sc/m · 32 B qh (5th bit) · 128 B nibbles         ``d·sc·q − dmin·m``
Q6_K    210    128 B low nibbles · 64 B 2-bit high · 16 int8 scales · fp16 d              ``d·sc·(q − 32)``
======  =====  =========================================================================  ===================

Bits/weight: 2.625, 3.4375, 4.5, 5.5, 6.5625. The byte order inside ``qs``/``qh``/``hmask`` is llama.cpp's
(ggml-common.h ``block_q*_K``); :func:`dequantize_q4_k` etc. reproduce gguf-py's ``gguf/quants.py``
operation for operation (bit-exact).

The quantizers follow llama.cpp's ``quantize_row_q*_K_ref`` (ggml-quants.c, no importance matrix): the
sub-block search ``make_qkx2_quants`` (Q2_K, Q4_K, Q5_K: scale and minimum by weighted least squares over
``nstep`` trial scales), ``make_q3_quants`` (Q3_K: iterative coordinate refinement) and ``make_qx_quants``
(Q6_K: 19 trial scales around ``nmax / max``), then the 4/6/8-bit quantization of the sub-block scales and
a final re-quantization of every weight with the stored (rounded) scales. Every float operation is
done in float32 in the C order (sums left to right: :func:`.gguf_blocks.seq_sum`), so the bytes equal
llama.cpp's when its C is compiled without FMA contraction — the test suite checks them against
``libggml``'s own ``quantize_row_q*_K_ref`` wherever llama-cpp-python is installed. The search loops run
over the 16/32 elements of a sub-block and the trial scales; every operation is vectorized over all
sub-blocks of the tensor.
"""

from __future__ import annotations

import torch

from .gguf_blocks import f16_at, f16_bytes, first_absmax, nearest_int, nibbles, rdiv, seq_sum

_U8 = torch.uint8


def _shifts(values, shape, device) -> torch.Tensor:
    return torch.tensor(values, dtype=_U8, device=device).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Dequantization: [N, bytes] uint8 → [N, 256] float32 (gguf-py's order of operations)
# ----------------------------------------------------------------------------------------------------


def _q2_parts(b):
    n = b.shape[0]
    sc, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = f16_at(b, 80), f16_at(b, 82)
    dl = (d * (sc & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    return q.reshape(n, 16, 16).to(torch.float32).mul_(dl), ml     # dl · q, ml


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    scaled, ml = _q2_parts(b)
    return scaled.sub_(ml).reshape(b.shape[0], 256)                 # dl · q − ml


def _q3_scales(sc: torch.Tensor) -> torch.Tensor:
    # 12 bytes → 16 signed 6-bit scales (already minus 32), as int32.
    n = sc.shape[0]
    lo = (sc[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), sc.device)).reshape(n, 16)
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), sc.device)).reshape(n, 16)
    return ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int32) - 32


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, d = b[:, 0:32], b[:, 32:96], f16_at(b, 108)
    dl = (d * _q3_scales(b[:, 96:108]).to(torch.float32)).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    hb = (hmask.reshape(n, -1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)) & 1
    q = ql.view(torch.int8).reshape(n, 16, 16) - ((hb ^ 1) << 2).view(torch.int8).reshape(n, 16, 16)
    return q.to(torch.float32).mul_(dl).reshape(n, 256)             # a set hmask bit means "no −4"


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes → 8 six-bit scales and 8 six-bit mins (``get_scale_min_k4``)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k45_parts(b: torch.Tensor, q: torch.Tensor):
    # q: the codes [N, 8, 32] in float32 (consumed) → (d·sc · q, dmin·m [N, 8, 1])
    n = b.shape[0]
    sc, mn = _k4_scale_min(b[:, 4:16])
    dl = (f16_at(b, 0) * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (f16_at(b, 2) * mn.to(torch.float32)).reshape(n, -1, 1)
    return q.mul_(dl), dm


def _q4k_codes(b):
    return nibbles(b[:, 16:144].reshape(b.shape[0], 4, 32), torch.float32).reshape(b.shape[0], 8, 32)


def _q5k_codes(b):
    n = b.shape[0]
    q = nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(list(range(8)), (1, 8, 1), b.device)) & 1
    return q.bitwise_or_(qh << 4).to(torch.float32)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    scaled, dm = _k45_parts(b, _q4k_codes(b))
    return scaled.sub_(dm).reshape(b.shape[0], 256)                 # d·sc · q − dmin·m


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    scaled, dm = _k45_parts(b, _q5k_codes(b))
    return scaled.sub_(dm).reshape(b.shape[0], 256)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (f16_at(b, 208) * sc).reshape(n, 16, 1)
    lo = nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    q = lo.bitwise_or_(hi.reshape(n, 8, 32) << 4).view(torch.int8) - 32
    return q.reshape(n, 16, 16).to(torch.float32).mul_(d).reshape(n, 256)   # (d·sc) · (q − 32)


# The K-quants with a minimum, split into "scaled codes" and the per-16 offset (Ŵ = scaled − offset in
# the dequantization's own rounding), for llama.cpp's Q8_K dot product, which applies the minimum through
# the activation's 16-element sums (bsums).


def split_q2_k(b):
    scaled, ml = _q2_parts(b)
    return scaled.reshape(b.shape[0], 256), -ml.reshape(b.shape[0], 16)


def split_q4_k(b):
    scaled, dm = _k45_parts(b, _q4k_codes(b))
    return scaled.reshape(b.shape[0], 256), -dm.reshape(b.shape[0], 8).repeat_interleave(2, dim=1)


def split_q5_k(b):
    scaled, dm = _k45_parts(b, _q5k_codes(b))
    return scaled.reshape(b.shape[0], 256), -dm.reshape(b.shape[0], 8).repeat_interleave(2, dim=1)


# ----------------------------------------------------------------------------------------------------
# llama.cpp's sub-block searches, vectorized over sub-blocks (rows of x)
# ----------------------------------------------------------------------------------------------------


def _f(v: float) -> torch.Tensor:
    # A float32 scalar: constant arithmetic done on these rounds like the C ``float`` expressions.
    return torch.tensor(v, dtype=torch.float32)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` for every row of ``x`` ``[B, n]`` with weights ``w``: ``(scale [B], min [B]
    (the positive ``the_min``), L [B, n] int32 in 0..nmax)`` with ``x ≈ scale·L − min``."""
    xmin, xmax = x.amin(dim=1), x.amax(dim=1)
    sum_w, sum_x = seq_sum(torch.stack((w, w * x)))
    mn = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    flat = xmax == mn
    rng = xmax - mn
    iscale = rdiv(float(nmax), rng)
    scale = 1.0 / iscale

    def err(s, m, lv):
        diff = s.unsqueeze(1) * lv.to(torch.float32) + m.unsqueeze(1) - x
        return seq_sum(w * (diff.abs() if use_mad else diff * diff))

    L = nearest_int(iscale.unsqueeze(1) * (x - mn.unsqueeze(1))).clamp(0, nmax)
    best = err(scale, mn, L)
    for i in range(nstep + 1):
        # (rmin + rdelta*is + nmax) in float32, left to right, as the C expression
        c = float((_f(rmin) + _f(rdelta) * _f(i)) + _f(nmax))
        isc = rdiv(c, xmax - mn)
        la = nearest_int(isc.unsqueeze(1) * (x - mn.unsqueeze(1))).clamp(0, nmax)
        lf = la.to(torch.float32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seq_sum(torch.stack((wl, wl * lf, wl * x)))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min, la)
        better = (D > 0) & (cur < best)
        L = torch.where(better.unsqueeze(1), la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat.unsqueeze(1), torch.zeros_like(L), L)
    return scale, -mn, L


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` per row: ``(scale [B], L [B, n] in 0..2·nmax−1)``
    with ``x ≈ scale·(L − nmax)`` (weights ``x²``; 19 trial scales)."""
    amax, mx = first_absmax(x)
    zero = amax < 1e-15
    w = x * x
    wx = w * x

    def trial(iscale):
        lv = nearest_int(iscale.unsqueeze(1) * x).clamp(-nmax, nmax - 1)
        lf = lv.to(torch.float32)
        sumlx, suml2 = seq_sum(torch.stack((wx * lf, w * lf * lf)))
        return lv, sumlx, suml2

    iscale = rdiv(float(-nmax), mx)
    lv, sumlx, suml2 = trial(iscale)
    L = lv + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        c = -float(_f(nmax) + _f(0.1) * _f(i))  # -(nmax + 0.1f*is)
        lv, sumlx, suml2 = trial(rdiv(c, mx))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better.unsqueeze(1), lv + nmax, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(1), torch.zeros_like(L), L)
    return scale, L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` per row: ``(scale [B], L [B, n] in 0..2·nmax−1)``.

    The refinement visits the elements in order, each update depending on the previous ones; it runs as a
    loop over the ``n`` element positions (and up to 5 passes), vectorized over rows. A row whose pass
    changes nothing stops changing (the pass is a deterministic function of the state), which is what the
    C ``break`` does.
    """
    amax, mx = first_absmax(x)
    zero = amax < 1e-15
    n = x.shape[1]
    iscale = rdiv(float(-nmax), mx)
    L = nearest_int(iscale.unsqueeze(1) * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.to(torch.float32)
    sumlx, suml2 = seq_sum(torch.stack((wx * lf, w * lf * lf)))
    xc, wc, wxc = x.t().contiguous(), w.t().contiguous(), wx.t().contiguous()
    L = L.t().contiguous()
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            li = L[i].to(torch.float32)
            slx = sumlx - wxc[i] * li
            sl2 = suml2 - wc[i] * li * li
            new_l = nearest_int(xc[i] * sl2 / slx).clamp(-nmax, nmax - 1)
            nf = new_l.to(torch.float32)
            slx2 = slx + wxc[i] * nf
            sl22 = sl2 + wc[i] * nf * nf
            take = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(take, new_l, L[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    L = L.t() + nmax
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(1), torch.zeros_like(L), L)
    return scale, L


# ----------------------------------------------------------------------------------------------------
# Quantization: [N, 256] float32 → [N, bytes] uint8 (quantize_row_q*_K_ref)
# ----------------------------------------------------------------------------------------------------


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    # ``float m = 0; for (j) if (v[j] > m) m = v[j];`` — +0.0 when nothing is positive (the mins of flat
    # sub-blocks are −0.0, and clamp_min would keep that sign, which fp16 stores).
    m = v.amax(dim=1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _requantize(x, d, dm, L, lo, hi):
    """``l = nearest_int((x + dm) / d)`` clamped, for sub-blocks whose ``d ≠ 0`` (others keep ``L``)."""
    q = nearest_int((x + dm.unsqueeze(-1)) / d.unsqueeze(-1)).clamp(lo, hi)
    return torch.where((d != 0).unsqueeze(-1), q, L)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    # [N, 256] in 0..3 → [N, 64]: byte l of half h holds L[h·128 + l + 32·k] in bits 2k.
    n = L.shape[0]
    v = L.to(_U8).reshape(n, 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, 64)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    # 8 six-bit scales and mins → 12 bytes (the inverse of _k4_scale_min).
    ls, lm = ls.to(_U8), lm.to(_U8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat((first, second, third), dim=1)


def _k45_quantize(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av_x = torch.sqrt(seq_sum(xs * xs) / 32.0)
    w = av_x.unsqueeze(1) + xs.abs()
    scales, mins, L = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    inv_s = torch.where(max_scale > 0, rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, rdiv(63.0, max_min), torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(…); ls = MIN(63, ls): the int → uint8 conversion wraps modulo 256.
    ls = torch.remainder(nearest_int(inv_s.unsqueeze(1) * scales), 256).clamp_max(63)
    lm = torch.remainder(nearest_int(inv_m.unsqueeze(1) * mins), 256).clamp_max(63)
    d16, dmin16 = f16_bytes(max_scale / 63.0), f16_bytes(max_min / 63.0)
    d = d16.view(torch.float16).to(torch.float32) * ls.to(torch.float32)
    dm = dmin16.view(torch.float16).to(torch.float32) * lm.to(torch.float32)
    L = _requantize(x.reshape(n, 8, 32), d, dm, L, 0, nmax)
    return torch.cat((d16, dmin16, _pack_k4_scales(ls, lm)), dim=1), L


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q4_K_ref``: 8 sub-blocks of 32, ``make_qkx2_quants(32, 15, w = rms + |x|, −1, 0.1,
    20)``, 6-bit scales and mins against ``max/63``, then 4-bit codes with the stored scales."""
    head, L = _k45_quantize(x, 15, -1.0, 0.1, 20)
    n = x.shape[0]
    v = L.to(_U8).reshape(n, 4, 2, 32)
    return torch.cat((head, (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, 128)), dim=1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q5_K_ref``: as Q4_K with ``nmax = 31`` and ``make_qkx2_quants(…, −0.5, 0.1, 15)``; the
    5th bit of sub-block pair ``p`` goes to bits ``2p`` / ``2p + 1`` of ``qh``."""
    head, L = _k45_quantize(x, 31, -0.5, 0.1, 15)
    n = x.shape[0]
    v = L.to(_U8).reshape(n, 4, 2, 32)
    qs = ((v[:, :, 0] & 0x0F) | ((v[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    hb = (v >> 4).reshape(n, 8, 32)  # sub-block s → bit s of qh[l]
    qh = torch.zeros(n, 32, dtype=_U8, device=x.device)
    for s in range(8):
        qh |= hb[:, s] << s
    return torch.cat((head, qh, qs), dim=1)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q2_K_ref``: 16 sub-blocks of 16, ``make_qkx2_quants(16, 3, w = |x|, −0.5, 0.1, 15,
    mad)``, 4-bit scales and mins against ``max/15``, then 2-bit codes with the stored scales."""
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = torch.remainder(nearest_int(rdiv(15.0, max_scale).unsqueeze(1) * scales), 256)
    ls = torch.where(has_s.unsqueeze(1), ls, torch.zeros_like(ls))
    lm = torch.remainder(nearest_int(rdiv(15.0, max_min).unsqueeze(1) * mins), 256)
    # y.scales[j] = ls; if (max_min > 0) y.scales[j] |= lm << 4   (uint8 arithmetic)
    sc = torch.where(has_m.unsqueeze(1), ls | ((lm << 4) & 0xFF), ls).to(_U8)
    zero = torch.zeros_like(max_scale)
    d16 = f16_bytes(torch.where(has_s, max_scale / 15.0, zero))
    dmin16 = f16_bytes(torch.where(has_m, max_min / 15.0, zero))
    d = d16.view(torch.float16).to(torch.float32) * (sc & 0xF).to(torch.float32)
    dm = dmin16.view(torch.float16).to(torch.float32) * (sc >> 4).to(torch.float32)
    L = _requantize(x.reshape(n, 16, 16), d, dm, L, 0, 3)
    return torch.cat((sc, _pack_2bit(L.reshape(n, 256)), d16, dmin16), dim=1)


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    # 16 values in 0..63 → 12 bytes: low nibbles of j and j + 8 share byte j; 2 high bits of j go to
    # byte 8 + j % 4 at bit 2·(j // 4).
    l = l.to(_U8)
    low = (l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4)
    hi = (l >> 4).reshape(-1, 4, 4)  # [N, j // 4, j % 4]
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat((low, high), dim=1)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q3_K_ref``: 16 sub-blocks of 16, ``make_q3_quants(16, 4, rmse)``, signed 6-bit
    scales against ``max/−32``, then 3-bit codes (2 low bits in ``qs``, the 3rd in ``hmask``)."""
    n = x.shape[0]
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    _, max_scale = first_absmax(scales)
    has = max_scale != 0
    iscale = rdiv(-32.0, max_scale)
    # int8_t l = nearest_int(…): wraps to int8 before the clamp.
    l8 = nearest_int(iscale.unsqueeze(1) * scales).to(torch.int8).to(torch.int32)
    l = l8.clamp(-32, 31) + 32
    l = torch.where(has.unsqueeze(1), l, torch.zeros_like(l))
    d16 = f16_bytes(torch.where(has, 1.0 / iscale, torch.zeros_like(iscale)))
    d = d16.view(torch.float16).to(torch.float32) * (l - 32).to(torch.float32)
    d = torch.where(has.unsqueeze(1), d, torch.zeros_like(d))
    q = nearest_int(x.reshape(n, 16, 16) / d.unsqueeze(-1)).clamp(-4, 3) + 4
    L = torch.where((d != 0).unsqueeze(-1), q, L).reshape(n, 256)
    hbit = L > 3
    low = torch.where(hbit, L - 4, L)
    hm = hbit.to(_U8).reshape(n, 8, 32)  # element j → hmask[j % 32] bit j // 32
    hmask = torch.zeros(n, 32, dtype=_U8, device=x.device)
    for k in range(8):
        hmask |= hm[:, k] << k
    return torch.cat((hmask, _pack_2bit(low), _pack_q3_scales(l), d16), dim=1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q6_K_ref``: 16 sub-blocks of 16, ``make_qx_quants(16, 32, rmse_type 1)``, int8 scales
    against ``max/−128``, then 6-bit codes with the stored scales."""
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    amax, max_scale = first_absmax(scales)
    empty = amax < 1e-15
    iscale = rdiv(-128.0, max_scale)
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp_max(127).to(torch.int8)
    d16 = f16_bytes(1.0 / iscale)
    d = d16.view(torch.float16).to(torch.float32) * sc.to(torch.float32)
    L = _requantize(x.reshape(n, 16, 16), d, torch.zeros_like(d), L - 32, -32, 31) + 32
    v = L.reshape(n, 2, 4, 32).to(_U8)  # [half, quarter k, l] = L[h·128 + 32k + l]
    ql = torch.cat(((v[:, :, 0] & 0xF) | ((v[:, :, 2] & 0xF) << 4),
                    (v[:, :, 1] & 0xF) | ((v[:, :, 3] & 0xF) << 4)), dim=2).reshape(n, 128)
    qh = ((v[:, :, 0] >> 4) | ((v[:, :, 1] >> 4) << 2) | ((v[:, :, 2] >> 4) << 4)
          | ((v[:, :, 3] >> 4) << 6)).reshape(n, 64)
    out = torch.cat((ql, qh, sc.view(_U8), d16), dim=1)
    return torch.where(empty.unsqueeze(1), torch.zeros_like(out), out)


DEQUANTIZE = {"q2_k": dequantize_q2_k, "q3_k": dequantize_q3_k, "q4_k": dequantize_q4_k,
              "q5_k": dequantize_q5_k, "q6_k": dequantize_q6_k}
QUANTIZE = {"q2_k": quantize_q2_k, "q3_k": quantize_q3_k, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k,
            "q6_k": quantize_q6_k}
SPLIT = {"q2_k": split_q2_k, "q4_k": split_q4_k, "q5_k": split_q5_k}
