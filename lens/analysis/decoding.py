"""``lens.decoding``: what each decoding step did — sink and window attention, massive activations, and
agreement with another cache (docs/definitions.md "Sink score", "Massive activations").

A pure function of a Run from ``lens.generate``. Per step j (the forward that feeds generated token j):

* ``first_mass`` / ``sink_mass`` / ``window_mass``: the attention the new query puts on the first token, on
  the first ``sink_tokens`` tokens, and on the ``recent`` most recent tokens — the quantities StreamingLLM
  (Xiao et al., ICLR 2024, §3) keeps in its cache because queries lean on them;
* ``top_value``, ``top_dim``, ``massive_ratio``: the new token's largest residual entry, its dimension and
  |top| / median |x| (Sun et al., COLM 2024, call values with |x| > 100 and > 1000× the median *massive*);
* against a ``baseline`` run of the same prompts (e.g. the full cache, with ``lens.generate(...,
  force=baseline)`` so both see the same text): ``token_match`` and the per-step KL divergence
  KL(p_baseline ‖ p_run) of the next-token distributions, in nats; after the first mismatch of an
  unforced run the contexts differ, and KL is NaN there.

Example::

    full = lens.generate(lm, prompts, 32)
    stream = lens.generate(lm, prompts, 32, cache=lens.StreamingCache(4, 16), force=full)
    lens.decoding(stream, baseline=full).summary()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens.errors import ConfigError
from lens.run import Run

__all__ = ["DecodingResult", "decoding"]

_STATS = ("first_mass", "sink_mass", "window_mass")


@dataclass
class DecodingResult:
    """Per-step statistics of a generation (see the module docstring for definitions).

    ``first_mass``/``sink_mass``/``window_mass``: [L, H, M] (M steps over all sequences);
    ``top_value``/``massive_ratio``: [L+1, M]; ``top_dim``: [L+1, M]; ``sequence``, ``position``,
    ``token``: per step; ``token_match`` [M] bool and ``kl`` [M] (nats) when a baseline was given.
    """

    run: Run
    sequence: np.ndarray
    position: np.ndarray
    token: list[str]
    first_mass: np.ndarray
    sink_mass: np.ndarray
    window_mass: np.ndarray
    top_value: np.ndarray
    top_dim: np.ndarray
    massive_ratio: np.ndarray
    token_match: np.ndarray | None = None
    kl: np.ndarray | None = None

    @property
    def n_steps(self) -> int:
        return int(self.position.shape[0])

    def to_frame(self, kind: str = "steps"):
        """``"steps"``: one row per step — the masses averaged over heads and over layers 1..L−1 (layer 0
        has no sinks yet), the largest massive ratio over layers, and (with a baseline) ``token_match``
        and ``kl``. ``"layers"``: one row per (step, layer), masses averaged over heads.

        Example: ``lens.decoding(run).to_frame().plot(x="step", y="sink_mass")``.
        """
        import pandas as pd

        if kind == "steps":
            inner = slice(1, None) if self.first_mass.shape[0] > 1 else slice(None)
            frame = pd.DataFrame({
                "sequence": self.sequence,
                "step": np.arange(self.n_steps) - _first_step(self.sequence),
                "position": self.position,
                "token": self.token,
                **{name: getattr(self, name)[inner].mean(axis=(0, 1)) for name in _STATS},
                "massive_ratio": np.nanmax(self.massive_ratio, axis=0),
                "top_value": self.top_value[np.nanargmax(np.abs(self.top_value), axis=0), np.arange(self.n_steps)],
            })
            if self.token_match is not None:
                frame["token_match"] = self.token_match
                frame["kl"] = self.kl
            return frame
        if kind == "layers":
            L = self.first_mass.shape[0]
            rows = {
                "sequence": np.repeat(self.sequence, L),
                "step": np.repeat(np.arange(self.n_steps) - _first_step(self.sequence), L),
                "layer": np.tile(np.arange(L), self.n_steps),
            }
            for name in _STATS:
                rows[name] = getattr(self, name).mean(axis=1).T.reshape(-1)
            rows["massive_ratio"] = self.massive_ratio[:L].T.reshape(-1)
            return pd.DataFrame(rows)
        raise ConfigError(f"kind must be 'steps' or 'layers'; got {kind!r}")

    def summary(self) -> str:
        frame = self.to_frame()
        text = (
            f"{self.n_steps} decoding steps over {int(self.sequence.max()) + 1 if self.n_steps else 0} sequence(s): "
            f"mean attention on the first token {frame['first_mass'].mean():.3f}, on the sink tokens "
            f"{frame['sink_mass'].mean():.3f}, on the recent window {frame['window_mass'].mean():.3f}; "
            f"largest massive ratio {np.nanmax(self.massive_ratio):.0f}×"
        )
        if self.token_match is not None:
            text += (f"; tokens equal to the baseline {self.token_match.mean():.0%}, KL to the baseline mean "
                     f"{np.nanmean(self.kl):.2e}, max {np.nanmax(self.kl):.2e} nats")
        return text

    def figure(self):
        """Interactive plotly figure: sink / window mass per step (and KL to the baseline)."""
        from lens.report.figures import decoding_figure

        return decoding_figure(self)

    def show(self, stat: str = "sink_mass", **kwargs):
        """A ``TokenView`` of the text with each generated token coloured by ``stat`` (needs
        ``lens-interp[widgets]``)."""
        from lens.widgets import TokenView

        return TokenView.decoding(self.run, stat=stat, **kwargs)

    def __repr__(self) -> str:
        return f"DecodingResult({self.summary()})"

    def _repr_html_(self) -> str:
        return f"<p><b>DecodingResult</b>: {self.summary()}</p>" + self.to_frame().head(12).to_html(
            index=False, float_format=lambda v: f"{v:.3g}"
        )


def _first_step(sequence: np.ndarray) -> np.ndarray:
    """For each step, the index of its sequence's first step (so that ``step`` restarts at 0 per sequence)."""
    starts = np.zeros_like(sequence)
    if len(sequence):
        change = np.r_[True, sequence[1:] != sequence[:-1]]
        starts = np.maximum.accumulate(np.where(change, np.arange(len(sequence)), 0))
    return starts


def decoding(run: Run, *, baseline: Run | None = None) -> DecodingResult:
    """Per-step statistics of a ``lens.generate`` run, optionally against a ``baseline`` generation.

    Raises ``ConfigError`` when ``run`` (or ``baseline``) is not a generation, or when the baseline has
    other prompts or another model.

    Example: ``lens.decoding(stream, baseline=full).to_frame()[["step", "token", "token_match", "kl"]]``.
    """
    for which, r in (("run", run), ("baseline", baseline)):
        if r is not None and "gen.offsets" not in r.arrays:
            raise ConfigError(f"lens.decoding needs runs from lens.generate; the {which} has no decoding steps "
                              "(lens.trace runs whole sequences without a cache)")
    a = run.arrays
    offsets = a["gen.offsets"]
    sequence = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    tokens = [run.tokens[s][int(p)] for s, p in zip(sequence, a["gen.position"])]
    median = np.where(a["gen.median_abs"] > 0, a["gen.median_abs"], np.nan)
    result = DecodingResult(
        run=run, sequence=sequence, position=a["gen.position"], token=tokens,
        first_mass=a["gen.first_mass"], sink_mass=a["gen.sink_mass"], window_mass=a["gen.window_mass"],
        top_value=a["gen.top_value"], top_dim=a["gen.top_dim"], massive_ratio=np.abs(a["gen.top_value"]) / median,
    )
    if baseline is not None:
        result.token_match, result.kl = _against(run, baseline, sequence)
    return result


def _against(run: Run, baseline: Run, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if run.provenance.get("model_id") != baseline.provenance.get("model_id"):
        raise ConfigError("the baseline was generated by another model; compare generations of the same model")
    if run.provenance.get("prompt_sha256") != baseline.provenance.get("prompt_sha256"):
        raise ConfigError("the baseline has other prompts; generate both from the same prompts")
    a, b = run.arrays, baseline.arrays
    match = np.zeros(len(sequence), bool)
    kl = np.full(len(sequence), np.nan)
    for s in range(run.n_sequences):
        ra, rb = range(a["gen.offsets"][s], a["gen.offsets"][s + 1]), range(b["gen.offsets"][s], b["gen.offsets"][s + 1])
        ta = a["token_ids"][run.span(s)][a["gen.position"][ra.start]:]
        tb = b["token_ids"][baseline.span(s)][b["gen.position"][rb.start]:]
        n = min(len(ra), len(rb))
        equal = ta[:n] == tb[:n]
        match[ra.start : ra.start + n] = equal
        # the distribution of step j depends on tokens < j: comparable while every earlier token agrees
        agree = np.r_[True, np.cumprod(equal)[:-1].astype(bool)] if n else np.zeros(0, bool)
        lp_a, lp_b = a["gen.logprobs"][ra.start : ra.start + n], b["gen.logprobs"][rb.start : rb.start + n]
        with np.errstate(invalid="ignore"):
            values = (np.exp(lp_b) * (lp_b - lp_a)).sum(-1)
        kl[ra.start : ra.start + n] = np.where(agree, np.maximum(values, 0.0), np.nan)
    return match, kl
