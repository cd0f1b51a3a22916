"""``lens.compare(scan_a, scan_b)``: the same corpus scanned on two deployments (dense vs NVFP4, vs sparse)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from lens.errors import ConfigError

__all__ = ["ScanCompareResult", "compare_scans"]


def _label(scan) -> str:
    prov = scan.provenance
    kind = (prov.get("attention") or {}).get("kind", "dense")
    quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
    return kind + (f" + {quant}" if quant else "")


def _topk_docs(scan) -> dict[tuple[int, int], set[int]]:
    path = scan._parquet("examples.parquet")
    if path is None:
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["layer", "neuron", "doc"])
    layer, neuron, doc = (t.column(c).to_numpy() for c in ("layer", "neuron", "doc"))
    out: dict[tuple[int, int], set[int]] = {}
    for l, n, d in zip(layer.tolist(), neuron.tolist(), doc.tolist()):
        out.setdefault((l, n), set()).add(d)
    return out


@dataclass
class ScanCompareResult:
    """Per-neuron differences between two scans of the same corpus (b against a).

    ``jaccard`` [L, M]: |D_a ∩ D_b| / |D_a ∪ D_b| of the documents of the two top-k example sets (1 = the same
    documents). ``hist_distance`` [L, M]: total-variation distance ½ Σ |p_a − p_b| of the normalized histograms
    (0 = identical distributions, 1 = disjoint) — exact because both use the same fixed edges. ``mean_shift``
    [L, M]: mean_b − mean_a; ``mean_shift_z``: the same divided by std_a. ``max_ratio``: max_b / max_a.
    """

    scan_a: object = field(repr=False)
    scan_b: object = field(repr=False)
    labels: tuple[str, str]
    layers: list[int]
    jaccard: np.ndarray
    hist_distance: np.ndarray
    mean_shift: np.ndarray
    mean_shift_z: np.ndarray
    max_ratio: np.ndarray

    def to_frame(self):
        """One row per (layer, neuron) with every measure, plus ``moved`` = max(1 − jaccard, hist_distance)."""
        import pandas as pd

        L, M = self.jaccard.shape
        frame = pd.DataFrame({
            "layer": np.repeat(self.layers, M), "neuron": np.tile(np.arange(M), L),
            "jaccard": self.jaccard.reshape(-1), "hist_distance": self.hist_distance.reshape(-1),
            "mean_shift": self.mean_shift.reshape(-1), "mean_shift_z": self.mean_shift_z.reshape(-1),
            "max_ratio": self.max_ratio.reshape(-1),
        })
        frame["moved"] = np.maximum(1 - frame["jaccard"].fillna(1), frame["hist_distance"])
        return frame

    def most_moved(self, n: int = 20):
        """The ``n`` neurons whose behaviour changed most (by ``moved``, then |mean_shift_z|)."""
        frame = self.to_frame()
        frame["abs_z"] = frame["mean_shift_z"].abs()
        return frame.sort_values(["moved", "abs_z"], ascending=False).head(n).drop(columns="abs_z").reset_index(drop=True)

    def summary(self) -> str:
        return (f"{self.labels[0]} → {self.labels[1]}: mean top-k Jaccard {np.nanmean(self.jaccard):.3f}, "
                f"mean histogram distance {np.nanmean(self.hist_distance):.4f}, "
                f"|mean shift| (z) median {np.nanmedian(np.abs(self.mean_shift_z)):.3g}")

    def __repr__(self) -> str:
        return f"ScanCompareResult({self.summary()})"

    def _repr_html_(self) -> str:
        return (f"<div><b>lens scan comparison</b> — {html.escape(self.summary())}"
                f"{self.most_moved(8).to_html(index=False, float_format=lambda v: f'{v:.4g}')}</div>")


def compare_scans(a, b) -> ScanCompareResult:
    """Compare two scans of the same corpus neuron by neuron (see :class:`ScanCompareResult`).

    Raises ``ConfigError`` when the scans cover different corpora, layers or neuron counts.

    Example::

        dense = lens.scan(lens.load(), texts, out="dense")
        nvfp4 = lens.scan(lens.load(quant="nvfp4"), texts, out="nvfp4")
        lens.compare(dense, nvfp4).most_moved(10)
    """
    if getattr(b, "__lens_scan__", False) is not True:
        raise ConfigError(f"lens.compare got a Scan and a {type(b).__name__}; compare two scans (or two runs)")
    fa, fb = a.manifest["corpus"].get("sha256"), b.manifest["corpus"].get("sha256")
    if fa != fb:
        raise ConfigError("the two scans read different corpora (their fingerprints differ); scan the same corpus twice")
    if a.layers != b.layers or a.n_neurons != b.n_neurons:
        raise ConfigError(f"the scans cover different neurons (layers {a.layers} vs {b.layers}, "
                          f"{a.n_neurons} vs {b.n_neurons} per layer); scan the same layers of the same architecture")
    L, M = len(a.layers), a.n_neurons
    da, db = _topk_docs(a), _topk_docs(b)
    jac = np.full((L, M), np.nan)
    for li, layer in enumerate(a.layers):
        for n in range(M):
            sa, sb = da.get((layer, n)), db.get((layer, n))
            if sa or sb:
                sa, sb = sa or set(), sb or set()
                jac[li, n] = len(sa & sb) / len(sa | sb)
    ha = a.arrays["neuron.hist"].astype(np.float64)
    hb = b.arrays["neuron.hist"].astype(np.float64)
    pa = ha / np.maximum(ha.sum(-1, keepdims=True), 1)
    pb = hb / np.maximum(hb.sum(-1, keepdims=True), 1)
    tv = 0.5 * np.abs(pa - pb).sum(-1)
    shift = b.arrays["neuron.mean"] - a.arrays["neuron.mean"]
    std_a = a.std()
    z = np.divide(shift, std_a, out=np.full_like(shift, np.nan), where=std_a > 0)
    max_a, max_b = a.arrays["neuron.max"].astype(np.float64), b.arrays["neuron.max"].astype(np.float64)
    ratio = np.divide(max_b, max_a, out=np.full_like(max_a, np.nan), where=max_a != 0)
    return ScanCompareResult(a, b, (_label(a), _label(b)), list(a.layers), jac, tv, shift, z, ratio)
