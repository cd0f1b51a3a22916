"""Activation smoothing and calibration: SmoothQuant and its modality-aware variant.

SmoothQuant: ``s = max|X|^alpha / max|W|^(1-alpha)``, alpha = 0.5 (Xiao et al. 2023); the modality-aware
variant (MASQuant-style) keeps separate factors for two token groups, e.g. visual and text tokens of a VLM.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layers import _in_out, _progress, select_linear_modules

# ----------------------------------------------------------------------------------------------------
# Activations: per-token int8, smoothing, calibration
# ----------------------------------------------------------------------------------------------------


def fake_quant_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantization (docs/definitions.md#smoothing, activation quantization for W8A8):
    ``scale_t = max_j |x[t, j]| / 127``, ``x̂ = clamp(round(x / scale_t), −127, 127) · scale_t``, in fp32.

    Example: ``fake_quant_per_token_int8(torch.tensor([[1.0, 0.3]]))`` → ``[[1.0, 0.2992…]]`` (38/127).
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe).clamp(-127, 127) * scale


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors per input channel (docs/definitions.md#smoothing):
    ``s_j = max|X_j|^α / max_o |W[o, j]|^(1−α)``, with both maxima and ``s`` floored at 1e-5 (as the
    SmoothQuant reference does) so that dead channels cannot produce 0 or ∞.

    Example: ``smoothing_factors(torch.tensor([16.0]), torch.tensor([[4.0]]))`` → ``tensor([2.])``.
    """
    w_amax = weight.detach().abs().amax(dim=0).to(torch.float32).clamp_min(1e-5)
    a = act_amax.to(device=w_amax.device, dtype=torch.float32).clamp_min(1e-5)  # stats live on CPU
    return (a.pow(alpha) / w_amax.pow(1.0 - alpha)).clamp_min(1e-5)


_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("lens_token_mask",
                                                                                 default=None)


@contextlib.contextmanager
def token_groups(mask: torch.Tensor | None):
    """Mark token group 1 (e.g. visual tokens of a VLM) for the forward passes inside the block.

    ``mask`` is boolean with the shape of the layer inputs without the feature dim (``[batch, seq]``).
    :func:`calibrate` records per-group activation maxima while it is set, and :class:`QuantLinear` with
    modality-aware smoothing smooths the marked tokens with group 1's factors and the others with group
    0's (text) before quantizing them (docs/definitions.md#smoothing, MASQuant-style).

    Example::

        with token_groups(pixel_token_mask):
            model(**inputs)
    """
    tok = _TOKEN_MASK.set(None if mask is None else mask.to(torch.bool))
    try:
        yield
    finally:
        _TOKEN_MASK.reset(tok)


@dataclass
class ActStats:
    """Calibration statistics of one linear layer's input for SmoothQuant (docs/definitions.md#smoothing):
    per-channel ``max |X|`` over all tokens (``amax``) and, when token masks were given and matched the
    layer's input, per group (``group_amax[g]``, ``g = 0`` unmarked/text, ``1`` marked/visual) with token
    counts.

    Example: ``stats["encoder.layer.0.attention.self.query"].amax.shape`` → ``(384,)``.
    """

    amax: torch.Tensor
    tokens: int = 0
    group_amax: torch.Tensor | None = None
    group_tokens: tuple[int, int] = (0, 0)
    groups_matched: bool = True

    def to_dict(self) -> dict:
        """JSON-able summary (channel maxima as lists) (docs/definitions.md).

        Example: ``json.dumps(stats[name].to_dict())``.
        """
        return {"amax": self.amax.tolist(), "tokens": self.tokens,
                "group_amax": None if self.group_amax is None else self.group_amax.tolist(),
                "group_tokens": list(self.group_tokens)}


def _call_model(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(model: nn.Module, batches: Iterable, *, include: Callable[[str, nn.Module], bool] | None = None,
              token_masks: Iterable[torch.Tensor | None] | None = None, progress: bool = False
              ) -> dict[str, ActStats]:
    """Collect per-channel input maxima of the layers :func:`quantize_model` would replace, for
    SmoothQuant (docs/definitions.md#smoothing).

    ``batches`` yields model inputs (a mapping → ``model(**batch)``, a tuple → ``model(*batch)``, a
    tensor → ``model(batch)``). ``token_masks``, parallel to ``batches``, marks group-1 tokens (visual
    tokens of a VLM) per batch; for layers whose input is not ``mask.shape + (in,)`` (e.g. a vision tower
    seeing patches) the grouping is dropped and ``groups_matched`` is False. Pad tokens count as
    activations too: pass masks or unpadded batches if that matters.

    Example::

        stats = calibrate(model, [tok(s, return_tensors="pt") for s in sentences])
        report = quantize_model(model, QuantConfig.from_name("w8a8-smooth"), calibration=stats)
    """
    targets = select_linear_modules(model, include)
    acc: dict[str, dict] = {}

    def make_hook(name: str, in_features: int):
        def hook(_mod, args):
            x = args[0].detach()
            flat = x.reshape(-1, in_features).abs().to(torch.float32)
            a = acc.setdefault(name, {"amax": torch.zeros(in_features), "tokens": 0,
                                      "g": torch.zeros(2, in_features), "gt": [0, 0], "matched": True})
            if flat.shape[0]:
                a["amax"] = torch.maximum(a["amax"], flat.amax(0).cpu())
            a["tokens"] += flat.shape[0]
            mask = _TOKEN_MASK.get()
            if mask is None:
                return
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                a["matched"] = False
                return
            m = mask.reshape(-1).to(flat.device)
            for g, sel in ((0, ~m), (1, m)):
                n = int(sel.sum())
                if n:
                    a["g"][g] = torch.maximum(a["g"][g], flat[sel].amax(0).cpu())
                    a["gt"][g] += n
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name, _in_out(mod)[0])) for name, mod in targets]
    masks = iter(token_masks) if token_masks is not None else None
    any_mask = False
    try:
        bar = _progress(list(batches), progress, "calibrate")
        with torch.no_grad():
            for batch in bar:
                mask = next(masks, None) if masks is not None else None
                any_mask = any_mask or mask is not None
                with token_groups(mask):
                    _call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in acc.items():
        grouped = any_mask and a["matched"] and sum(a["gt"]) > 0
        out[name] = ActStats(a["amax"], a["tokens"], a["g"] if grouped else None,
                             tuple(a["gt"]) if grouped else (0, 0), a["matched"])
    return out




