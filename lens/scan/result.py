"""``Scan``: a finished corpus scan, read from its directory (checksums verified), queried without a full load."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from lens.atomic import sha256_file
from lens.errors import ConfigError, ScanFormatError
from lens.scan.storage import STATS, read_manifest

__all__ = ["Scan"]


def _quantiles(hist: np.ndarray, qs=(0.1, 0.5, 0.9)) -> np.ndarray:
    """Quantiles of values on [0, 1] from a histogram of equal bins (bin midpoint interpolation)."""
    bins = hist.shape[-1]
    cum = np.cumsum(hist, -1)
    total = np.maximum(cum[..., -1:], 1)
    out = []
    for q in qs:
        idx = (cum / total >= q).argmax(-1)
        out.append((idx + 0.5) / bins)
    return np.stack(out, -1)


class Scan:
    """The result of ``lens.scan``: per-neuron, per-head and per-layer statistics of a whole corpus.

    Dense statistics are in memory (``arrays``; shapes use L = scanned layers, M = neurons); examples,
    quantile samples, routing tokens and logit effects stay in Parquet files and are read per neuron, or
    queried with SQL through DuckDB (:meth:`query`), never loaded whole.

    Example::

        s = lens.Scan.load("scans/minilm")
        s.to_frame().sort_values("max", ascending=False).head()
        s.examples(3, 42)                      # top-k contexts of layer 3, neuron 42
        s.neurons_with_token(" Paris")         # neurons whose top examples contain the token
    """

    __lens_scan__ = True

    def __init__(self, folder: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.folder = Path(folder)
        self.manifest = manifest
        self.arrays = arrays

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike, *, verify: bool = True) -> "Scan":
        """Read a scan directory written by ``lens.scan``, checking every file's sha256 (``verify``).

        Raises ``ScanFormatError`` for a missing directory or manifest, an unfinished scan (resume it with
        ``lens.scan(..., out=folder, resume=True)``), a missing file or a checksum mismatch.
        """
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest.get("status") != "complete":
            raise ScanFormatError(f"the scan in {str(folder)!r} is not finished; resume it with lens.scan(..., resume=True)")
        for name, digest in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise ScanFormatError(f"{str(path)!r} is missing; the scan directory is incomplete — scan again")
            if verify and sha256_file(path) != digest:
                raise ScanFormatError(
                    f"{str(path)!r} does not match the checksum in its manifest (changed or damaged after the scan); "
                    "restore it from a copy or scan again"
                )
        try:
            arrays = load_file(str(folder / STATS))
        except Exception as exc:
            raise ScanFormatError(f"cannot read {str(folder / STATS)!r} ({exc}); scan again") from exc
        return cls(folder, manifest, arrays)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.get("provenance", {})

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.arrays["neuron.layers"]]

    @property
    def moe_layers(self) -> list[int]:
        return [int(x) for x in self.arrays.get("route.layers", np.zeros(0, np.int64))]

    @property
    def n_neurons(self) -> int:
        return int(self.arrays["neuron.mean"].shape[1]) if "neuron.mean" in self.arrays else 0

    @property
    def tokens(self) -> int:
        return int(self.arrays["corpus.tokens"][0])

    @property
    def windows(self) -> int:
        return int(self.arrays["corpus.windows"][0])

    @property
    def documents(self) -> int:
        return int(self.manifest["corpus"]["documents"])

    def _li(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ConfigError(f"layer {layer} was not scanned; this scan has layers {self.layers}") from None

    def _check(self, layer: int, neuron: int) -> int:
        li = self._li(layer)
        if not 0 <= int(neuron) < self.n_neurons:
            raise ConfigError(f"neuron {neuron} does not exist; neurons are 0..{self.n_neurons - 1}")
        return li

    # -- neurons ------------------------------------------------------------------------------------
    def std(self) -> np.ndarray:
        """[L, M] standard deviation (population) of each neuron's activation."""
        n = self.arrays["neuron.count"]
        return np.sqrt(np.divide(self.arrays["neuron.m2"], n, out=np.zeros_like(self.arrays["neuron.m2"]), where=n > 0))

    def to_frame(self):
        """One row per (layer, neuron): count, mean, std, min, max, fraction_positive, sparsity (= 1 − fraction
        > 0), fraction_zero (exact zeros), and the top example's value and token.

        Example: ``scan.to_frame().query("layer == 3").nlargest(10, "max")``.
        """
        import pandas as pd

        a = self.arrays
        if "neuron.mean" not in a:
            return pd.DataFrame(columns=["layer", "neuron"])
        L, M = a["neuron.mean"].shape
        count = a["neuron.count"]
        safe = np.maximum(count, 1)
        from lens.scan.reducers import ZERO_BIN

        frame = pd.DataFrame({
            "layer": np.repeat(self.layers, M),
            "neuron": np.tile(np.arange(M), L),
            "count": count.reshape(-1),
            "mean": a["neuron.mean"].reshape(-1),
            "std": self.std().reshape(-1),
            "min": a["neuron.min"].reshape(-1),
            "max": a["neuron.max"].reshape(-1),
            "fraction_positive": (a["neuron.positive"] / safe).reshape(-1),
            "fraction_zero": (a["neuron.hist"][..., ZERO_BIN] / safe).reshape(-1),
        })
        frame["sparsity"] = 1.0 - frame["fraction_positive"]
        return frame

    def histogram(self, layer: int, neuron: int) -> dict[str, np.ndarray]:
        """The neuron's histogram: ``lower``, ``upper`` (bin bounds on the fixed edges) and ``count``."""
        li = self._check(layer, neuron)
        return {"lower": self.arrays["hist.lower"], "upper": self.arrays["hist.upper"],
                "count": self.arrays["neuron.hist"][li, int(neuron)]}

    def _parquet(self, name: str) -> Path | None:
        path = self.folder / name
        return path if name in self.manifest.get("files", {}) and path.is_file() else None

    def _read(self, name: str, layer: int, key: str, value: int, columns=None):
        import pandas as pd
        import pyarrow.parquet as pq

        path = self._parquet(name)
        if path is None:
            return pd.DataFrame()
        table = pq.read_table(path, filters=[("layer", "=", int(layer)), (key, "=", int(value))], columns=columns)
        return table.to_pandas()

    def examples(self, layer: int, neuron: int):
        """The neuron's top-k examples (rank order): value, document, position, token, context tokens and
        activations, attention mass received, sink flag and massive-activation ratio. Reads only that neuron's
        rows of ``examples.parquet``."""
        self._check(layer, neuron)
        return self._read("examples.parquet", layer, "neuron", neuron).sort_values("rank").reset_index(drop=True)

    def samples(self, layer: int, neuron: int):
        """The neuron's quantile samples: a few examples per sign × decade group (hash-priority reservoirs)."""
        self._check(layer, neuron)
        frame = self._read("samples.parquet", layer, "neuron", neuron)
        return frame.sort_values(["group", "slot"]).reset_index(drop=True) if len(frame) else frame

    def logit_effects(self, layer: int, neuron: int):
        """Top (``direction == "up"``) and bottom tokens of W_U·(γ ⊙ W_out[:, n]); empty without an unembedding."""
        self._check(layer, neuron)
        frame = self._read("logits.parquet", layer, "neuron", neuron)
        return frame.sort_values(["direction", "rank"], ascending=[False, True]).reset_index(drop=True) if len(frame) else frame

    # -- SQL ------------------------------------------------------------------------------------------
    def connect(self):
        """A DuckDB connection with views ``examples``, ``samples``, ``routing``, ``logits`` over the Parquet files
        (read lazily by DuckDB) and ``neurons`` (the dense per-neuron table)."""
        try:
            import duckdb
        except ImportError as exc:
            from lens.errors import MissingDependencyError

            raise MissingDependencyError(f"Scan.query needs duckdb ({exc}); pip install 'lens-interp[scan]'") from exc
        con = duckdb.connect()
        for name in ("examples", "samples", "routing", "logits"):
            path = self._parquet(f"{name}.parquet")
            if path is not None:
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{str(path).replace(chr(39), chr(39) * 2)}')")
        neurons = self.to_frame()  # noqa: F841 (registered below)
        con.register("neurons", neurons)
        return con

    def query(self, sql: str, params: list | None = None):
        """Run SQL over the scan (see :meth:`connect` for the tables); returns a pandas DataFrame.

        Example: ``scan.query("SELECT layer, neuron, max(value) FROM examples WHERE token = ? GROUP BY ALL", [" cat"])``.
        """
        con = self.connect()
        try:
            return con.execute(sql, params or []).df()
        finally:
            con.close()

    def neurons_with_token(self, token: str | int, *, min_examples: int = 1):
        """Neurons whose top examples have ``token`` (a token string or id) at the example position, with how many
        of their top-k examples do and the highest such activation; most examples first."""
        column = "token_id" if isinstance(token, (int, np.integer)) else "token"
        if self._parquet("examples.parquet") is None:  # no dense MLP layer scanned (layers=[], a pure-MoE model)
            import pandas as pd

            return pd.DataFrame({"layer": np.zeros(0, np.int64), "neuron": np.zeros(0, np.int64),
                                 "examples": np.zeros(0, np.int64), "max_value": np.zeros(0, np.float32)})
        return self.query(
            f"SELECT layer, neuron, count(*) AS examples, max(value) AS max_value FROM examples WHERE {column} = ? "
            "GROUP BY layer, neuron HAVING count(*) >= ? ORDER BY examples DESC, max_value DESC, layer, neuron",
            [token if column == "token" else int(token), int(min_examples)],
        )

    # -- attention, residual, routing ----------------------------------------------------------------
    def heads_frame(self):
        """Per layer and head over windows: sink-score mean, std, 10/50/90 % quantiles (from its histogram)."""
        import pandas as pd

        a = self.arrays
        n = np.maximum(a["sink.count"], 1)
        L, H = n.shape
        q = _quantiles(a["sink.hist"])
        return pd.DataFrame({
            "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L), "windows": a["sink.count"].reshape(-1),
            "sink_score_mean": a["sink.mean"].reshape(-1), "sink_score_std": np.sqrt(a["sink.m2"] / n).reshape(-1),
            "sink_score_p10": q[..., 0].reshape(-1), "sink_score_p50": q[..., 1].reshape(-1),
            "sink_score_p90": q[..., 2].reshape(-1),
        })

    def layers_frame(self):
        """Per layer: sink rate (mean over windows of the fraction of sink heads), normalized raw and normalized
        matrix entropies over windows (mean, std, min, max, median), massive-activation entries and windows."""
        import pandas as pd

        a = self.arrays
        n_res = a["seq.count"].shape[0]
        windows = max(self.windows, 1)
        rate = np.concatenate([a["sink.rate_sum"] / windows, [np.nan]])
        n = np.maximum(a["seq.count"], 1)
        med = _quantiles(a["seq.hist"], (0.5,))[..., 0]
        frame = {"layer": np.arange(n_res), "sink_rate": rate}
        for c, name in enumerate(("entropy_raw", "entropy_normalized")):
            frame[f"{name}_mean"] = a["seq.mean"][:, c]
            frame[f"{name}_std"] = np.sqrt(a["seq.m2"][:, c] / n[:, c])
            frame[f"{name}_min"] = a["seq.min"][:, c]
            frame[f"{name}_max"] = a["seq.max"][:, c]
            frame[f"{name}_median"] = med[:, c]
        frame["massive_entries"] = a["massive.entries"]
        frame["massive_windows"] = a["massive.windows"]
        frame["massive_ratio_max"] = a["massive.ratio.max"]
        return pd.DataFrame(frame)

    def routing_frame(self):
        """MoE, per layer and expert: load (fraction of token slots routed to it), gate share, mean router
        probability, mean and max gate; with the layer's routing entropy and load-balance CV (docs/definitions.md,
        "MoE routing"). Empty for dense models."""
        import pandas as pd

        a = self.arrays
        if "route.load" not in a:
            return pd.DataFrame()
        load, tokens = a["route.load"], a["route.tokens"][:, None]
        Lm, E = load.shape
        slots = np.maximum(load.sum(1, keepdims=True), 1)
        frac = load / slots
        cv = frac.std(1) / np.maximum(frac.mean(1), 1e-30)
        return pd.DataFrame({
            "layer": np.repeat(self.moe_layers, E), "expert": np.tile(np.arange(E), Lm),
            "tokens": load.reshape(-1), "load": frac.reshape(-1),
            "gate_share": (a["route.gate_mass"] / np.maximum(a["route.gate_mass"].sum(1, keepdims=True), 1e-30)).reshape(-1),
            "mean_prob": (a["route.prob_mass"] / np.maximum(tokens, 1)).reshape(-1),
            "mean_gate": (a["route.gate_mass"] / np.maximum(load, 1)).reshape(-1),
            "max_gate": a["route.gate.max"].reshape(-1),
            "routing_entropy": np.repeat(a["route.entropy_sum"] / np.maximum(a["route.tokens"], 1), E),
            "load_cv": np.repeat(cv, E),
        })

    def top_tokens(self, layer: int, expert: int):
        """MoE: the top-k tokens by gate routed to ``expert`` in ``layer``."""
        return self._read("routing.parquet", layer, "expert", expert).sort_values("rank").reset_index(drop=True)

    def expert_neurons_frame(self):
        """MoE expert neurons (layer, expert, neuron) over the tokens routed to that expert: count, mean, std, max,
        fraction > 0."""
        import pandas as pd

        a = self.arrays
        if "expert_neuron.count" not in a:
            return pd.DataFrame()
        n = a["expert_neuron.count"]
        Lm, E, M = n.shape
        safe = np.maximum(n, 1)
        return pd.DataFrame({
            "layer": np.repeat(self.moe_layers, E * M), "expert": np.tile(np.repeat(np.arange(E), M), Lm),
            "neuron": np.tile(np.arange(M), Lm * E), "count": n.reshape(-1),
            "mean": a["expert_neuron.mean"].reshape(-1), "std": np.sqrt(a["expert_neuron.m2"] / safe).reshape(-1),
            "max": a["expert_neuron.max"].reshape(-1), "fraction_positive": (a["expert_neuron.positive"] / safe).reshape(-1),
        })

    # -- comparison and views -----------------------------------------------------------------------
    def compare(self, other: "Scan"):
        """Per-neuron differences to another scan of the same corpus (``lens.compare(scan_a, scan_b)``)."""
        from lens.scan.compare import compare_scans

        return compare_scans(self, other)

    def figure(self, layer: int | None = None):
        """Plotly: max vs fraction > 0 of every neuron (one colour per layer), for finding neurons to open."""
        from lens.report.neuron_figures import scan_figure

        return scan_figure(self, layer)

    def show(self, **kwargs):
        """Open the ``NeuronExplorer`` widget on this scan (needs ``lens-interp[widgets]``)."""
        from lens.widgets import NeuronExplorer

        return NeuronExplorer(self, **kwargs)

    def summary(self) -> str:
        model = self.provenance.get("model_id", "?")
        return (f"{model}: {self.documents:,} documents, {self.tokens:,} tokens, {self.windows:,} windows, "
                f"{len(self.layers)} layers × {self.n_neurons} neurons"
                + (f", MoE layers {self.moe_layers}" if self.moe_layers else ""))

    def __repr__(self) -> str:
        return f"Scan({self.summary()}, folder={str(self.folder)!r})"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        top = frame.nlargest(8, "max")[["layer", "neuron", "max", "mean", "fraction_positive"]] if len(frame) else frame
        return (f"<div><b>lens Scan</b> — {html.escape(self.summary())}<br><small>{html.escape(str(self.folder))}</small>"
                f"<br>neurons with the highest max:{top.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</div>")
