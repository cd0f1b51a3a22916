"""Turn a scan's merged state into its files: dense statistics (safetensors), examples (Parquet), logit effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lens.scan.reducers import EMPTY_DOC, bin_edges, group_bounds
from lens.scan.storage import STATS, write_parquet, write_stats

__all__ = ["finalize", "logit_effects", "TokenText"]


class TokenText:
    """Token id → display string, decoded once per id (``tokenizer.decode([id])``, as a ``Run`` shows tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {-1: ""}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        unique = np.unique(ids)
        for i in unique:
            i = int(i)
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i])
        table = np.array([self.cache[int(i)] for i in unique], dtype=object)
        return table[np.searchsorted(unique, ids)] if ids.size else np.array([], dtype=object)

    def arrow(self, ids: np.ndarray):
        """The same strings as a pyarrow string array, built from a dictionary of the distinct ids in C++ (a scan
        writes ~10⁶ context tokens; a Python object per token cost most of its finalize)."""
        import pyarrow as pa

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and ids.min() >= -1 and ids.max() < 1 << 24:  # token ids: distinct ones by a table, not a sort
            present = np.zeros(int(ids.max()) + 2, dtype=bool)
            present[ids + 1] = True
            unique = np.flatnonzero(present) - 1
            index = (np.cumsum(present) - 1)[ids + 1]
        else:
            unique, index = np.unique(ids, return_inverse=True)
        words = pa.array(self(unique).tolist(), type=pa.string())
        return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), words).dictionary_decode()


def _lists(values: np.ndarray, width: int, pa_type):
    import pyarrow as pa

    flat = pa.array(values.reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _out_weight(module) -> torch.Tensor:
    """W_out as [d_model, d_mlp] from Linear, GPT-2's Conv1D, or a low-bit QuantLinear."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().float()
    weight = module.weight.detach().float()
    if type(module).__name__ == "Conv1D":
        return weight.T
    return weight


@torch.no_grad()
def logit_effects(lm, layers, k: int = 10, chunk: int = 512):
    """Top and bottom ``k`` tokens of W_U·(γ_final ⊙ W_out[:, n]) for every neuron of ``layers``.

    The direct effect a neuron's output direction has on the logits through the final norm's gain
    (docs/definitions.md, "Corpus scans"; weight-based, no forward pass). Returns (up_ids, up_vals, down_ids,
    down_vals), each [len(layers), d_mlp, k], or None for models without an unembedding.
    """
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    if head is None or not lm.causal or k <= 0 or not layers:
        return None
    w_u = (head.dequantized_weight() if hasattr(head, "dequantized_weight") else head.weight).detach().float()
    gamma = torch.ones(lm.d_model)
    norm = lm.final_norm
    if norm is not None and getattr(norm, "weight", None) is not None:
        gamma = norm.weight.detach().float()
        if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by (1 + weight)
            gamma = 1.0 + gamma
    k = min(k, w_u.shape[0])  # before sizing: no fake rows past the vocabulary
    shape = (len(layers), lm.d_mlp, k)
    up_i, down_i = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    up_v, down_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for li, layer in enumerate(layers):
        w_out = _out_weight(lm.mlp_out_modules[layer]) * gamma[:, None]  # [d, M]
        for s in range(0, w_out.shape[1], chunk):
            # [c, V], one neuron per contiguous row: top-k along rows is 2× faster than along columns of [V, c]
            # (a 30-layer model's logit effects took longer than scanning 3·10³ tokens), with no negated copy
            eff = w_out[:, s : s + chunk].T @ w_u.T
            top = eff.topk(k, dim=1)
            bot = eff.topk(k, dim=1, largest=False)
            up_i[li, s : s + chunk, :k] = top.indices.numpy()
            up_v[li, s : s + chunk, :k] = top.values.numpy()
            down_i[li, s : s + chunk, :k] = bot.indices.numpy()
            down_v[li, s : s + chunk, :k] = bot.values.numpy()
    return up_i, up_v, down_i, down_v


def finalize(folder: Path, lm, cfg, state: dict[str, np.ndarray], *, logit_effects: int = 10) -> list[str]:
    """Write the finished scan's files into ``folder``; returns their names (for the manifest's checksums)."""
    text = TokenText(lm.tokenizer)
    layers = np.asarray(cfg.layers, dtype=np.int64)
    dense = {k: v for k, v in state.items() if not k.startswith(("topk.", "sample.", "route_topk."))}
    lower, upper = bin_edges()
    dense["hist.lower"], dense["hist.upper"] = lower, upper
    dense["neuron.layers"] = layers
    dense["route.layers"] = np.asarray(cfg.moe_layers, dtype=np.int64)
    write_stats(folder, dense, {"layers": list(cfg.layers), "moe_layers": list(cfg.moe_layers)})
    files = [STATS]
    # a layer at a time: the contexts' strings of every layer at once were the scan's peak memory
    if "topk.value" in state:
        write_parquet(folder / "examples.parquet", (_examples(state, li, layers, cfg, text) for li in range(len(layers))))
        files.append("examples.parquet")
    if "sample.priority" in state:
        write_parquet(folder / "samples.parquet", (_samples(state, li, layers, cfg, text) for li in range(len(layers))))
        files.append("samples.parquet")
    if "route_topk.value" in state:
        live = state["route_topk.doc"] != EMPTY_DOC
        li, e, rank = np.nonzero(live)
        write_parquet(folder / "routing.parquet", {
            "layer": np.asarray(cfg.moe_layers, dtype=np.int64)[li], "expert": e.astype(np.int64),
            "rank": rank.astype(np.int32), "gate": state["route_topk.value"][live],
            "doc": state["route_topk.doc"][live], "position": state["route_topk.pos"][live],
            "token_id": state["route_topk.token"][live], "token": text.arrow(state["route_topk.token"][live]),
        })
        files.append("routing.parquet")
    effects = _effects = None
    if logit_effects:
        effects = globals()["logit_effects"](lm, list(cfg.layers), logit_effects)
    if effects is not None:
        up_i, up_v, down_i, down_v = effects
        L, M, k = up_i.shape
        li, n, rank = np.meshgrid(np.arange(L), np.arange(M), np.arange(k), indexing="ij")
        cols = {"layer": [], "neuron": [], "direction": [], "rank": [], "token_id": [], "token": [], "effect": []}
        for direction, ids, vals in (("up", up_i, up_v), ("down", down_i, down_v)):
            cols["layer"].append(layers[li.reshape(-1)])
            cols["neuron"].append(n.reshape(-1))
            cols["direction"].append(np.full(li.size, 0 if direction == "up" else 1, dtype=np.int32))
            cols["rank"].append(rank.reshape(-1).astype(np.int32))
            cols["token_id"].append(ids.reshape(-1))
            cols["token"].append(ids.reshape(-1))
            cols["effect"].append(vals.reshape(-1))
        import pyarrow as pa

        columns = {k: np.concatenate(v) for k, v in cols.items()}
        columns["direction"] = pa.DictionaryArray.from_arrays(pa.array(columns["direction"]),
                                                               pa.array(["up", "down"])).dictionary_decode()
        columns["token"] = text.arrow(columns["token"])
        write_parquet(folder / "logits.parquet", columns)
        files.append("logits.parquet")
    del _effects
    return files


def _examples(state: dict[str, np.ndarray], li: int, layers: np.ndarray, cfg, text: TokenText) -> dict:
    """The top-k rows of layer index ``li`` (neuron, then rank)."""
    C = cfg.width
    live = state["topk.doc"][li] != EMPTY_DOC  # [M, k]
    n, rank = np.nonzero(live)
    ids = state["topk.tokens"][li][live]  # [R, C]
    return {
        "layer": np.full(len(n), layers[li], dtype=np.int64), "neuron": n.astype(np.int64),
        "rank": rank.astype(np.int32), "value": state["topk.value"][li][live], "doc": state["topk.doc"][li][live],
        "position": state["topk.pos"][li][live],
        "token_id": ids[:, cfg.context[0]].astype(np.int64),
        "token": text.arrow(ids[:, cfg.context[0]]),
        "context_ids": _lists(ids.astype(np.int32), C, _pa("int32")),
        "context_tokens": _token_lists(text, ids, C),
        "context_acts": _lists(state["topk.acts"][li][live].astype(np.float32), C, _pa("float32")),
        "mass": state["topk.mass"][li][live], "is_sink": state["topk.sink"][li][live].astype(bool),
        "massive_ratio": state["topk.massive"][li][live],
    }


def _samples(state: dict[str, np.ndarray], li: int, layers: np.ndarray, cfg, text: TokenText) -> dict:
    """The quantile-sample rows of layer index ``li`` (neuron, group, slot)."""
    C = cfg.width
    live = state["sample.doc"][li] >= 0  # [M, G, samples]
    n, g, slot = np.nonzero(live)
    bounds = np.asarray(group_bounds())
    ids = state["sample.tokens"][li][live]
    return {
        "layer": np.full(len(n), layers[li], dtype=np.int64), "neuron": n.astype(np.int64),
        "group": g.astype(np.int32), "group_lower": bounds[g, 0], "group_upper": bounds[g, 1],
        "slot": slot.astype(np.int32), "value": state["sample.value"][li][live], "doc": state["sample.doc"][li][live],
        "position": state["sample.pos"][li][live], "priority": state["sample.priority"][li][live],
        "token": text.arrow(ids[:, cfg.context[0]]),
        "context_ids": _lists(ids.astype(np.int32), C, _pa("int32")),
        "context_tokens": _token_lists(text, ids, C),
    }


def _token_lists(text: TokenText, ids: np.ndarray, width: int):
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(text.arrow(ids), width)


def _pa(name: str):
    import pyarrow as pa

    return getattr(pa, name)()
