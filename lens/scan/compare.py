"""``lens.compare(scan_a, scan_b)``: the same corpus scanned on two deployments (dense vs NVFP4, vs sparse).

Dense MLP neurons (layer, neuron) compare by top-k example overlap, histogram distance and mean/max shift; the
expert neurons of MoE layers (layer, expert, neuron) by mean/max shift over the tokens routed to that expert
(the scan keeps no histograms or examples for them); the routing per (layer, expert) by load, gate share,
routing entropy and the overlap of the top tokens by gate (docs/definitions.md, "Corpus scans", "MoE routing").
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from lens.errors import ConfigError

__all__ = ["ScanCompareResult", "compare_scans"]

#: scan options that change which tokens the statistics count: two scans must agree on them to be compared
_WINDOWING = ("max_len", "stride", "prepend_bos")


def _label(scan) -> str:
    prov = scan.provenance
    kind = (prov.get("attention") or {}).get("kind", "dense")
    quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
    return kind + (f" + {quant}" if quant else "")


def _top_rows(scan, name: str, key: str, members: list[str], k: int):
    """The rows of rank < k of a ranked Parquet file (``examples``/``routing``): columns layer, key, *members."""
    import pandas as pd

    path = scan._parquet(name)
    columns = ["layer", key, *members]
    if path is None:
        return pd.DataFrame({c: np.zeros(0, np.int64) for c in columns})
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[*columns, "rank"], filters=[("rank", "<", int(k))])
    return table.to_pandas()[columns].drop_duplicates()


def _jaccard(rows_a, rows_b, key: str, members: list[str], layers: list[int], n: int) -> np.ndarray:
    """[len(layers), n] Jaccard |A ∩ B| / |A ∪ B| of the member sets per (layer, key); NaN where both are empty."""
    import pandas as pd

    keys = ["layer", key]
    size_a = rows_a.groupby(keys).size().rename("a")
    size_b = rows_b.groupby(keys).size().rename("b")
    both = rows_a.merge(rows_b, on=[*keys, *members]).groupby(keys).size().rename("both")
    sizes = pd.concat([size_a, size_b, both], axis=1).fillna(0)
    out = np.full((len(layers), n), np.nan)
    if len(sizes):
        where = {layer: i for i, layer in enumerate(layers)}
        li = np.array([where[int(l)] for l in sizes.index.get_level_values(0)], dtype=np.int64)
        ki = sizes.index.get_level_values(1).to_numpy().astype(np.int64)
        out[li, ki] = sizes["both"] / (sizes["a"] + sizes["b"] - sizes["both"])
    return out


def _shift(mean_a, mean_b, m2_a, count_a, count_b, max_a, max_b):
    """mean_b − mean_a, the same over std_a, max_b / max_a; NaN where either side counted no token."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    counted = (count_a > 0) & (count_b > 0)
    shift = np.where(counted, mean_b - mean_a, np.nan)
    std_a = np.sqrt(np.divide(m2_a, count_a, out=np.zeros_like(mean_a), where=count_a > 0))
    z = np.divide(shift, std_a, out=np.full_like(shift, np.nan), where=counted & (std_a > 0))
    max_a, max_b = np.asarray(max_a, np.float64), np.asarray(max_b, np.float64)
    ratio = np.divide(max_b, max_a, out=np.full_like(max_a, np.nan), where=counted & (max_a != 0))
    return shift, z, ratio


def _hist_distance(ha, hb) -> np.ndarray:
    """Total-variation distance ½ Σ |p_a − p_b| of histograms on the same edges (last axis)."""
    ha, hb = ha.astype(np.float64), hb.astype(np.float64)
    pa = ha / np.maximum(ha.sum(-1, keepdims=True), 1)
    pb = hb / np.maximum(hb.sum(-1, keepdims=True), 1)
    return 0.5 * np.abs(pa - pb).sum(-1)


@dataclass
class ScanCompareResult:
    """Differences between two scans of the same corpus (b against a).

    Dense MLP neurons (shapes [L, M]; L = scanned layers, M = neurons; empty for pure-MoE models such as
    Mixtral): ``jaccard``: |D_a ∩ D_b| / |D_a ∪ D_b| of the documents of the two top-k example sets over the
    common ``top_k`` = min(k_a, k_b) ranks (1 = the same documents; NaN when neither has examples).
    ``hist_distance``: total-variation distance ½ Σ |p_a − p_b| of the normalized histograms (0 = identical
    distributions, 1 = disjoint) — exact because both use the same fixed edges. ``mean_shift``: mean_b − mean_a;
    ``mean_shift_z``: the same divided by std_a. ``max_ratio``: max_b / max_a.

    MoE expert neurons (shapes [Lm, E, Me] over ``moe_layers``; empty for dense models), each over the tokens
    routed to its expert: ``expert_mean_shift``, ``expert_mean_shift_z``, ``expert_max_ratio`` as above (NaN
    where either scan routed no token to the expert), ``expert_tokens`` [2, Lm, E]: tokens routed in a and b.
    ``routing``: per (layer, expert) the load, gate share, mean gate and routing entropy of both scans, their
    shifts and ``top_token_jaccard`` (overlap of the top-k tokens by gate as (document, position) sets).

    Example::

        result = lens.compare(dense_scan, int8_scan)
        result.most_moved(10)                    # dense neurons (expert neurons for a pure-MoE model)
        result.to_frame("routing").nlargest(5, "load_shift")
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
    top_k: int = 0
    top_ks: tuple[int, int] = (0, 0)
    moe_layers: list[int] = field(default_factory=list)
    expert_mean_shift: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    expert_mean_shift_z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    expert_max_ratio: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    expert_tokens: np.ndarray = field(default_factory=lambda: np.zeros((2, 0, 0), np.int64))
    routing: object = field(default=None, repr=False)

    def to_frame(self, kind: str = "neurons"):
        """A pandas DataFrame of one kind of unit:

        * ``"neurons"``: one row per dense (layer, neuron) with every measure, plus ``moved`` =
          max(1 − jaccard, hist_distance) (no rows for a pure-MoE model);
        * ``"experts"``: one row per (layer, expert, neuron) with tokens_a, tokens_b (tokens routed to the
          expert), mean_shift, mean_shift_z, max_ratio (no rows for a dense model);
        * ``"routing"``: one row per (layer, expert), see the class docstring (no rows for a dense model).

        Raises ``ConfigError`` for another ``kind``.
        Example: ``lens.compare(a, b).to_frame("experts").query("layer == 1")``.
        """
        import pandas as pd

        if kind == "neurons":
            L, M = self.jaccard.shape
            frame = pd.DataFrame({
                "layer": np.repeat(np.asarray(self.layers, np.int64), M), "neuron": np.tile(np.arange(M), L),
                "jaccard": self.jaccard.reshape(-1), "hist_distance": self.hist_distance.reshape(-1),
                "mean_shift": self.mean_shift.reshape(-1), "mean_shift_z": self.mean_shift_z.reshape(-1),
                "max_ratio": self.max_ratio.reshape(-1),
            })
            frame["moved"] = np.maximum(1 - frame["jaccard"].fillna(1), frame["hist_distance"])
            return frame
        if kind == "experts":
            Lm, E, M = self.expert_mean_shift.shape
            return pd.DataFrame({
                "layer": np.repeat(np.asarray(self.moe_layers, np.int64), E * M),
                "expert": np.tile(np.repeat(np.arange(E), M), Lm), "neuron": np.tile(np.arange(M), Lm * E),
                "tokens_a": np.repeat(self.expert_tokens[0].reshape(-1), M),
                "tokens_b": np.repeat(self.expert_tokens[1].reshape(-1), M),
                "mean_shift": self.expert_mean_shift.reshape(-1), "mean_shift_z": self.expert_mean_shift_z.reshape(-1),
                "max_ratio": self.expert_max_ratio.reshape(-1),
            })
        if kind == "routing":
            return self.routing.copy() if self.routing is not None else pd.DataFrame()
        raise ConfigError(f'kind must be "neurons", "experts" or "routing"; got {kind!r}')

    def most_moved(self, n: int = 20, kind: str | None = None):
        """The ``n`` units whose behaviour changed most. ``kind`` as in :meth:`to_frame`; by default the dense
        neurons, or the expert neurons when the model has none. Neurons rank by ``moved`` then |mean_shift_z|;
        expert neurons by |mean_shift_z| then |mean_shift|; routing rows by |load_shift| then 1 − top_token_jaccard.
        """
        if kind is None:
            kind = "neurons" if self.jaccard.size or not self.expert_mean_shift.size else "experts"
        frame = self.to_frame(kind)
        if kind == "neurons":
            keys = {"moved": frame["moved"], "abs_z": frame["mean_shift_z"].abs()}
        elif kind == "experts":
            keys = {"abs_z": frame["mean_shift_z"].abs(), "abs_shift": frame["mean_shift"].abs()}
        else:
            if not len(frame):
                return frame
            keys = {"abs_load": frame["load_shift"].abs(), "top_moved": 1 - frame["top_token_jaccard"].fillna(1)}
        frame = frame.assign(**{f"_{k}": v for k, v in keys.items()})
        order = [f"_{k}" for k in keys]
        return (frame.sort_values(order, ascending=False, na_position="last").head(n)
                .drop(columns=order).reset_index(drop=True))

    def summary(self) -> str:
        parts = []
        if self.jaccard.size:
            k = f"top-{self.top_k}" + (f" (of {self.top_ks[0]} and {self.top_ks[1]})" if self.top_ks[0] != self.top_ks[1] else "")
            with np.errstate(all="ignore"):
                parts.append(f"mean {k} Jaccard {np.nanmean(self.jaccard):.3f}, "
                             f"mean histogram distance {np.nanmean(self.hist_distance):.4f}, "
                             f"|mean shift| (z) median {np.nanmedian(np.abs(self.mean_shift_z)):.3g}")
        if self.expert_mean_shift.size:
            z = np.abs(self.expert_mean_shift_z)
            parts.append(f"expert neurons |mean shift| (z) median "
                         f"{np.nanmedian(z) if np.isfinite(z).any() else float('nan'):.3g}")
        if self.routing is not None and len(self.routing):
            parts.append(f"routing max |load shift| {self.routing['load_shift'].abs().max():.4f}")
        return f"{self.labels[0]} → {self.labels[1]}: " + "; ".join(parts)

    def __repr__(self) -> str:
        return f"ScanCompareResult({self.summary()})"

    def _repr_html_(self) -> str:
        return (f"<div><b>lens scan comparison</b> — {html.escape(self.summary())}"
                f"{self.most_moved(8).to_html(index=False, float_format=lambda v: f'{v:.4g}')}</div>")


def _check(a, b) -> None:
    if getattr(b, "__lens_scan__", False) is not True:
        raise ConfigError(f"lens.compare got a Scan and a {type(b).__name__}; compare two scans (or two runs)")
    # the per-document fingerprint does not depend on shard_size; scans written before it had only the shard chain
    key = "documents_sha256" if all("documents_sha256" in s.manifest["corpus"] for s in (a, b)) else "sha256"
    fa, fb = a.manifest["corpus"].get(key), b.manifest["corpus"].get(key)
    if fa != fb:
        raise ConfigError("the two scans read different corpora (their fingerprints differ); scan the same corpus twice")
    ma, mb = a.manifest.get("model", {}), b.manifest.get("model", {})
    shape = [f"{k} {ma.get(k)!r} vs {mb.get(k)!r}" for k in ("architecture", "n_layers", "d_model", "d_mlp")
             if ma.get(k) != mb.get(k)]
    if shape:  # two deployments of one model share these; different models give numbers without meaning
        raise ConfigError(f"the scans come from different models ({', '.join(shape)}); compare two deployments of "
                          "the same model (dense vs quantized or sparse)")
    ca, cb = a.config, b.config
    differ = [f"{k} {ca.get(k)!r} vs {cb.get(k)!r}" for k in _WINDOWING if ca.get(k) != cb.get(k)]
    if differ:
        raise ConfigError(f"the scans cut the corpus into windows differently ({', '.join(differ)}), so their statistics "
                          f"count different tokens; scan both with the same {', '.join(_WINDOWING)}")
    if a.layers != b.layers or a.n_neurons != b.n_neurons:
        raise ConfigError(f"the scans cover different neurons (layers {a.layers} vs {b.layers}, "
                          f"{a.n_neurons} vs {b.n_neurons} per layer); scan the same layers of the same architecture")
    ea, eb = a.arrays.get("expert_neuron.mean"), b.arrays.get("expert_neuron.mean")
    if a.moe_layers != b.moe_layers or (ea is None) != (eb is None) or (ea is not None and ea.shape != eb.shape):
        sa, sb = ("none" if e is None else "×".join(map(str, e.shape)) for e in (ea, eb))
        raise ConfigError(f"the scans cover different MoE experts (MoE layers {a.moe_layers} vs {b.moe_layers}, expert "
                          f"neurons {sa} vs {sb}); scan the same architecture")
    if not (a.n_neurons and "neuron.hist" in a.arrays) and ea is None and "route.load" not in a.arrays:
        raise ConfigError("the two scans hold no neuron or routing statistics to compare (no dense MLP neurons, "
                          "no MoE layers); scan with layers=None (every layer) to compare neurons")


def _routing(a, b, k: int):
    """Per (layer, expert): the routing statistics of both scans, their shifts and the top-token overlap."""
    import pandas as pd

    ra, rb = a.routing_frame(), b.routing_frame()
    if not len(ra):
        return pd.DataFrame()
    keys = ["layer", "expert"]
    cols = ["tokens", "load", "gate_share", "mean_gate", "routing_entropy"]
    frame = ra[keys + cols].merge(rb[keys + cols], on=keys, suffixes=("_a", "_b"))
    for c in cols[1:]:
        frame[f"{c}_shift"] = frame[f"{c}_b"] - frame[f"{c}_a"]
    layers, E = a.moe_layers, int(a.arrays["route.load"].shape[1])
    members = ["doc", "position"]
    jac = _jaccard(_top_rows(a, "routing.parquet", "expert", members, k),
                   _top_rows(b, "routing.parquet", "expert", members, k), "expert", members, layers, E)
    where = {layer: i for i, layer in enumerate(layers)}
    frame["top_token_jaccard"] = jac[frame["layer"].map(where).to_numpy(), frame["expert"].to_numpy()]
    return frame


def compare_scans(a, b) -> ScanCompareResult:
    """Compare two scans of the same corpus: dense neurons, MoE expert neurons and routing (see
    :class:`ScanCompareResult`). Scans kept with different ``top_k`` compare their common top-min(k) examples
    (exact: the top-k of a scan is a prefix of its top-k' for k' > k).

    Raises ``ConfigError`` when ``b`` is not a Scan, when the scans cover different corpora, windowing
    (max_len, stride, prepend_bos), layers, neuron counts or experts, or when they hold nothing to compare.

    Example::

        dense = lens.scan(lens.load(), texts, out="dense")
        nvfp4 = lens.scan(lens.load(quant="nvfp4"), texts, out="nvfp4")
        lens.compare(dense, nvfp4).most_moved(10)
    """
    _check(a, b)
    top_ks = (int(a.config.get("top_k", 0)), int(b.config.get("top_k", 0)))
    k = min(top_ks)
    L, M = len(a.layers), a.n_neurons
    dense = [np.zeros((L, M)) for _ in range(5)]
    if L and M:
        members = ["doc"]
        jac = _jaccard(_top_rows(a, "examples.parquet", "neuron", members, k),
                       _top_rows(b, "examples.parquet", "neuron", members, k), "neuron", members, a.layers, M)
        tv = _hist_distance(a.arrays["neuron.hist"], b.arrays["neuron.hist"])
        shift = _shift(a.arrays["neuron.mean"], b.arrays["neuron.mean"], a.arrays["neuron.m2"],
                       a.arrays["neuron.count"], b.arrays["neuron.count"], a.arrays["neuron.max"], b.arrays["neuron.max"])
        dense = [jac, tv, *shift]
    experts: dict = {}
    if "expert_neuron.mean" in a.arrays:
        pa, pb = (lambda n: a.arrays[f"expert_neuron.{n}"]), (lambda n: b.arrays[f"expert_neuron.{n}"])
        shift, z, ratio = _shift(pa("mean"), pb("mean"), pa("m2"), pa("count"), pb("count"), pa("max"), pb("max"))
        tokens = np.stack([pa("count").max(-1), pb("count").max(-1)]).astype(np.int64)
        experts = {"expert_mean_shift": shift, "expert_mean_shift_z": z, "expert_max_ratio": ratio, "expert_tokens": tokens}
    return ScanCompareResult(a, b, (_label(a), _label(b)), list(a.layers), *dense, top_k=k, top_ks=top_ks,
                             moe_layers=list(a.moe_layers), routing=_routing(a, b, k), **experts)
