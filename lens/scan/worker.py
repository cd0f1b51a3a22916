"""One shard of a corpus → one mergeable partial state (docs/definitions.md, "Corpus scans").

The same code runs in the local engine and inside every Ray actor, so both cut documents into the same
windows, batch them the same way and produce bit-identical partial states. A batch of windows is traced with
``lens.trace`` (attention and residual probes: sink scores, entropies, massive activations, per-token
attention mass) while forward hooks on the MLP output projections (and the MoE routers) reduce the neuron
activations on the fly: nothing of size tokens × neurons outlives its hook.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lens.analysis.sinks import sinks, uniform_share
from lens.analysis.valley import valley
from lens.capture.moe import MoEHooks, expert_activations
from lens.capture.trace import trace
from lens.errors import CaptureError, ScanError
from lens.scan.config import ScanConfig
from lens.scan.corpus import Window, text_digest, windows
from lens.scan.engine import release_free_memory
from lens.scan.fused import fill_topk, merge_samples, reduce_layer
from lens.scan.reducers import (
    BIN_TO_GROUP, EMPTY_DOC, HIST_EDGES, N_BINS, RESERVOIR_GROUPS, ZERO_BIN, merge_state, moments_merge,
    token_priority,
)

__all__ = ["ShardWorker", "empty_state", "SEQ_BINS"]

SEQ_BINS = 20  # histograms of sink scores and normalized entropies: 20 equal bins on [0, 1]
_I64MAX = np.iinfo(np.int64).max


def empty_state(lm, cfg: ScanConfig, top_width: int | None = None, samples: bool = True) -> dict[str, np.ndarray]:
    """The identity of ``merge_state``: every array at its fixed shape, nothing counted.

    ``top_width``: slots of the neuron top-k arrays (default ``top_k``); a batch's partial state holds only as
    many as it has documents. ``samples=False`` leaves out the reservoirs (a batch merges its own straight into
    its shard's state)."""
    L, M, k, C = len(cfg.layers), lm.d_mlp, cfg.top_k, cfg.width
    kt = k if top_width is None else top_width
    G, r = RESERVOIR_GROUPS, cfg.samples
    n_layers, H = lm.n_layers, lm.n_heads
    s: dict[str, np.ndarray] = {
        "corpus.tokens": np.zeros(1, np.int64),
        "corpus.windows": np.zeros(1, np.int64),
        "sink.count": np.zeros((n_layers, H), np.int64),
        "sink.mean": np.zeros((n_layers, H)),
        "sink.m2": np.zeros((n_layers, H)),
        "sink.hist": np.zeros((n_layers, H, SEQ_BINS), np.int64),
        "sink.rate_sum": np.zeros(n_layers),
        "seq.count": np.zeros((n_layers + 1, 2), np.int64),
        "seq.mean": np.zeros((n_layers + 1, 2)),
        "seq.m2": np.zeros((n_layers + 1, 2)),
        "seq.min": np.full((n_layers + 1, 2), np.inf),
        "seq.max": np.full((n_layers + 1, 2), -np.inf),
        "seq.hist": np.zeros((n_layers + 1, 2, SEQ_BINS), np.int64),
        "massive.entries": np.zeros(n_layers + 1, np.int64),
        "massive.windows": np.zeros(n_layers + 1, np.int64),
        "massive.ratio.max": np.zeros(n_layers + 1, np.float32),
    }
    if L:
        s.update({
            "neuron.count": np.zeros((L, M), np.int64),
            "neuron.mean": np.zeros((L, M)),
            "neuron.m2": np.zeros((L, M)),
            "neuron.min": np.full((L, M), np.inf, np.float32),
            "neuron.max": np.full((L, M), -np.inf, np.float32),
            "neuron.positive": np.zeros((L, M), np.int64),
            "neuron.hist": np.zeros((L, M, N_BINS), np.int64),
            "topk.value": np.full((L, M, kt), -np.inf, np.float32),
            "topk.doc": np.full((L, M, kt), EMPTY_DOC, np.int64),
            "topk.pos": np.zeros((L, M, kt), np.int64),
            "topk.tokens": np.full((L, M, kt, C), -1, np.int32),
            "topk.acts": np.full((L, M, kt, C), np.nan, np.float32),
            "topk.mass": np.zeros((L, M, kt), np.float32),
            "topk.sink": np.zeros((L, M, kt), np.uint8),
            "topk.massive": np.zeros((L, M, kt), np.float32),
        })
        if r and samples:
            s.update({
                "sample.priority": np.full((L, M, G, r), _I64MAX, np.int64),
                "sample.value": np.full((L, M, G, r), np.nan, np.float32),
                "sample.doc": np.full((L, M, G, r), -1, np.int64),
                "sample.pos": np.zeros((L, M, G, r), np.int64),
                "sample.tokens": np.full((L, M, G, r, C), -1, np.int32),
            })
    Lm, E = len(cfg.moe_layers), lm.n_experts
    if Lm:
        s.update({
            "route.tokens": np.zeros(Lm, np.int64),
            "route.load": np.zeros((Lm, E), np.int64),
            "route.gate_mass": np.zeros((Lm, E)),
            "route.prob_mass": np.zeros((Lm, E)),
            "route.entropy_sum": np.zeros(Lm),
            "route.gate.max": np.zeros((Lm, E), np.float32),
            "route_topk.value": np.full((Lm, E, k), -np.inf, np.float32),
            "route_topk.doc": np.full((Lm, E, k), EMPTY_DOC, np.int64),
            "route_topk.pos": np.zeros((Lm, E, k), np.int64),
            "route_topk.token": np.full((Lm, E, k), -1, np.int64),
            "expert_neuron.count": np.zeros((Lm, E, lm.d_expert), np.int64),
            "expert_neuron.mean": np.zeros((Lm, E, lm.d_expert)),
            "expert_neuron.m2": np.zeros((Lm, E, lm.d_expert)),
            "expert_neuron.max": np.full((Lm, E, lm.d_expert), -np.inf, np.float32),
            "expert_neuron.positive": np.zeros((Lm, E, lm.d_expert), np.int64),
        })
    return s


@dataclass
class _Batch:
    """Where the counted tokens of one batch of windows are (rows sorted longest first, as lens.trace runs them)."""

    windows: list[Window]
    ids: torch.Tensor  # [B, T] int64, −1 padded
    owned: torch.Tensor  # [B, T] bool: real tokens this window counts
    rows: torch.Tensor  # [N] flat (b·T + t) index of every counted token
    doc: torch.Tensor  # [N] document id
    pos: torch.Tensor  # [N] document position
    flat: np.ndarray  # [N] index of the token in the traced Run's flat arrays
    priority: np.ndarray  # [N] reservoir priority of (document, position)
    order: np.ndarray  # [N] counted tokens by priority, lowest first (stable)
    doc_np: np.ndarray  # [N] ``doc`` as numpy
    pos_np: np.ndarray  # [N] ``pos`` as numpy
    ids_np: np.ndarray  # [B, T] ``ids`` as numpy
    rows_np: np.ndarray  # [N] ``rows`` as numpy
    lengths_np: np.ndarray  # [B] tokens of each window
    docs: np.ndarray  # [D] the distinct documents of the batch, ascending
    docl: np.ndarray  # [N] index of each counted token's document in ``docs``
    prefix_np: np.ndarray  # [B] repeated leading tokens of each window (context only, not at their position)
    doc_tokens: np.ndarray  # the whole token ids of the D documents, concatenated (contexts are cut from these)
    doc_offset: np.ndarray  # [D + 1] where each document's ids start in ``doc_tokens``


class ShardWorker:
    """Turns shards of ``(document id, text)`` into partial scan states for one loaded model.

    Example::

        worker = ShardWorker(lm, cfg)
        state, info = worker.run_shard(0, [(0, "a text"), (1, "another")])
    """

    def __init__(self, lm, cfg: ScanConfig):
        self.lm = lm
        self.cfg = cfg
        self.specials = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
        from lens.capture.interventions import from_description

        self.edits = [from_description(d) for d in cfg.interventions]
        self.positional = cfg.positional
        self._pending: list = []

    # -- tokens -------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole documents, with the tokenizer's special tokens and the family's BOS rule."""
        lm = self.lm
        tok = lm.tokenizer
        # prepend_bos as in lens.trace (TransformerLens's meaning): True — position 0 is BOS; False — it is
        # not, even where the tokenizer adds one; None — the family's default
        prepend = lm.family.prepend_bos if self.cfg.prepend_bos is None else self.cfg.prepend_bos
        bos = getattr(tok, "bos_token_id", None)
        if bos is None and prepend and lm.causal:
            bos = getattr(tok, "eos_token_id", None)
        out = []
        for ids in tok(texts, add_special_tokens=True, verbose=False)["input_ids"]:
            ids = list(ids)
            if prepend and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            elif self.cfg.prepend_bos is False and bos is not None and len(ids) > 1 and ids[0] == bos:
                ids = ids[1:]
            out.append(ids)
        return out

    # -- one shard ----------------------------------------------------------------------------------
    def batches(self, docs: list[tuple[int, str]]) -> list[list[Window]]:
        """The windows of a shard's documents in the batches ``run_shard`` runs: longest first (stably), then
        ``batch_size`` at a time — so a batch pads little (at the docstring corpus, 28 k padded tokens per 20 k
        real instead of 56 k in corpus order), and every engine batches a shard the same way."""
        cfg = self.cfg
        all_windows: list[Window] = []
        for (doc, _), ids in zip(docs, self.tokenize([t for _, t in docs])):
            if not ids:
                continue
            first_special = ids[0] in self.specials
            cut = windows(doc, ids, cfg.max_len, cfg.stride, repeat_first=first_special)
            if len(cut) > 1 and self.positional:
                raise ScanError(
                    f"document {doc} has {len(ids)} tokens, more than max_len={cfg.max_len}, so it is cut into windows; "
                    "an intervention with positions (or keys, or kind='mean') means positions of a whole document. "
                    "Raise max_len (up to the model's positions), shorten the documents, or use positions=None"
                )
            all_windows.extend(cut)
        all_windows.sort(key=lambda w: -len(w.ids))
        return [all_windows[i : i + cfg.batch_size] for i in range(0, len(all_windows), cfg.batch_size)]

    @torch.inference_mode()
    def run_shard(self, shard: int, docs: list[tuple[int, str]], progress=None) -> tuple[dict, dict]:
        """Partial state of one shard and its record (documents, tokens, windows, text digest)."""
        cfg = self.cfg
        digest = hashlib.sha256()
        for doc, text in docs:
            digest.update(doc.to_bytes(8, "little") + text_digest(text))
        batches = self.batches(docs)
        state = empty_state(self.lm, cfg)
        tokens = 0
        for batch_windows in batches:
            part = self._run_batch(batch_windows, state)
            state = merge_state(state, part, top_k=cfg.top_k, samples=cfg.samples, inplace=True)
            del part
            release_free_memory()  # batches of every size fragment the C heap (see release_free_memory)
            counted = sum(len(w.ids) - w.keep for w in batch_windows)
            tokens += counted
            if progress is not None:
                progress(counted)
        info = {
            "shard": shard,
            "documents": len(docs),
            "first_doc": docs[0][0] if docs else None,
            "last_doc": docs[-1][0] if docs else None,
            "windows": sum(len(b) for b in batches),
            "tokens": tokens,
            "sha256": digest.hexdigest(),
        }
        return state, info

    # -- one batch ----------------------------------------------------------------------------------
    def _layout(self, ws: list[Window]) -> _Batch:
        # longest first (stable): the order lens.trace runs a batch in, so its rows are ours
        ws = sorted(ws, key=lambda w: -len(w.ids))
        B, T = len(ws), max(len(w.ids) for w in ws)
        ids = torch.full((B, T), -1, dtype=torch.long)
        owned = torch.zeros((B, T), dtype=torch.bool)
        pos = torch.full((B, T), -1, dtype=torch.long)
        doc = torch.zeros((B, T), dtype=torch.long)
        flat_start = np.cumsum([0] + [len(w.ids) for w in ws])
        flat = np.full((B, T), -1, dtype=np.int64)
        for b, w in enumerate(ws):
            n = len(w.ids)
            ids[b, :n] = torch.tensor(w.ids)
            owned[b, w.keep : n] = True
            pos[b, w.prefix : n] = torch.arange(w.start, w.start + n - w.prefix)
            doc[b] = w.doc
            flat[b, :n] = np.arange(flat_start[b], flat_start[b] + n)
        rows = owned.reshape(-1).nonzero().squeeze(1)
        d = doc.reshape(-1)[rows]
        p = pos.reshape(-1)[rows]
        d_np, p_np = d.numpy(), p.numpy()
        priority = token_priority(d_np, p_np)
        docs, docl = np.unique(d_np, return_inverse=True)
        whole = {w.doc: w.document for w in ws}
        lengths = [len(whole[int(x)]) for x in docs]
        doc_offset = np.cumsum([0, *lengths]).astype(np.int64)
        doc_tokens = np.fromiter((t for x in docs for t in whole[int(x)]), dtype=np.int64, count=int(doc_offset[-1]))
        return _Batch(ws, ids, owned, rows, d, p, flat.reshape(-1)[rows.numpy()], priority,
                      np.argsort(priority, kind="stable"), d_np, p_np, ids.numpy(), rows.numpy(),
                      (ids >= 0).sum(1).numpy(), docs.astype(np.int64), docl.astype(np.int64).reshape(-1),
                      np.array([w.prefix for w in ws], dtype=np.int64), doc_tokens, doc_offset)

    def _run_batch(self, ws: list[Window], state: dict) -> dict:
        """The partial state of one batch of windows, except its reservoir samples: those are merged straight
        into ``state`` (the shard's state, modified in place), the only thing ``merge_state(state, part)`` would
        have done with them."""
        lm, cfg = self.lm, self.cfg
        batch = self._layout(ws)
        documents = max(len(batch.docs), 1)
        part = empty_state(lm, cfg, top_width=min(documents, cfg.top_k), samples=False)
        self._pending = []
        handles = []
        for li, layer in enumerate(cfg.layers):
            handles.append(lm.mlp_out_modules[layer].register_forward_pre_hook(self._mlp_hook(li, batch, part, state)))
        moe = MoEHooks(lm, self._moe_callback(batch, part)) if cfg.moe_layers else None
        try:
            if moe is not None:
                moe.attach()
            run = trace(lm, [list(w.ids) for w in batch.windows], capture=("attention", "residual"),
                        batch_size=len(batch.windows), top_k_massive=cfg.top_k_massive, progress=False,
                        prepend_bos=None,  # the windows are token ids: traced exactly as given
                        interventions=self.edits)
        finally:
            for h in handles:
                h.remove()
            if moe is not None:
                moe.detach()
        self._sequence_stats(run, part)
        self._attach_flags(run, batch, part)
        part["corpus.tokens"][0] = len(batch.rows)
        part["corpus.windows"][0] = len(batch.windows)
        return part

    # -- neurons ------------------------------------------------------------------------------------
    def _mlp_hook(self, li: int, batch: _Batch, part: dict, state: dict):
        def hook(module, args):
            act = args[0]
            if act.dim() == 2 and act.shape[0] == batch.ids.numel():  # flattened tokens (Qwen2-MoE's shared expert)
                act = act.reshape(*batch.ids.shape, act.shape[-1])
            if act.shape[:2] != batch.ids.shape:
                raise CaptureError(
                    f"the MLP of layer {self.cfg.layers[li]} saw a batch of shape {tuple(act.shape[:2])}, expected "
                    f"{tuple(batch.ids.shape)}; lens.trace changed how it batches — report this as a lens bug"
                )
            self._reduce_neurons(li, act, batch, part, state)

        return hook

    def _reduce_neurons(self, li: int, act: torch.Tensor, batch: _Batch, part: dict, state: dict) -> None:
        cfg = self.cfg
        B, T, M = act.shape
        a = act.reshape(B * T, M)[batch.rows].float()  # [N, M]
        N = a.shape[0]
        if N == 0:
            return
        r = reduce_layer(a.numpy(), batch.order, batch.docl, batch.pos_np, len(batch.docs), cfg.samples, RESERVOIR_GROUPS,
                         HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)
        part["neuron.count"][li] = N
        part["neuron.mean"][li] = r["mean"]
        part["neuron.m2"][li] = r["m2"]
        part["neuron.min"][li] = r["min"]
        part["neuron.max"][li] = r["max"]
        part["neuron.positive"][li] = r["positive"]
        part["neuron.hist"][li] = r["hist"]
        self._topk(li, act, r["docmax"], r["docbest"], batch, part)
        if cfg.samples:
            self._samples(li, a, r["chosen"], batch, state)

    def _topk(self, li: int, act: torch.Tensor, docmax: np.ndarray, docbest: np.ndarray, batch: _Batch,
              part: dict) -> None:
        """The best token of each document of the batch (``docbest``: its counted-token index, −1 for none),
        sorted by (value desc, document asc, position asc) — so that a merge can tell from the k-th entry alone
        whether the batch changes a neuron — with contexts; the part holds min(documents, top_k) slots."""
        B, T, M = act.shape
        out = {name: part["topk." + name][li] for name in ("value", "doc", "pos", "tokens", "acts")}
        rows = fill_topk(docmax, docbest, batch.docs, EMPTY_DOC, batch.pos_np, batch.rows_np,
                         act.reshape(B * T, M).float().numpy(), T, batch.prefix_np, batch.lengths_np, batch.doc_tokens,
                         batch.doc_offset, self.cfg.context[0], self.cfg.width, out)
        self._pending.append(("topk", li, rows, out["doc"] != EMPTY_DOC))

    def _samples(self, li: int, a: torch.Tensor, chosen: np.ndarray, batch: _Batch, state: dict) -> None:
        """Per (neuron, group): the ``samples`` counted tokens of lowest priority (hash of document, position), as
        chosen by the fused kernel (``chosen``: [M, G, r] counted-token indices by priority, −1 for none), merged
        into the state's reservoirs of this layer; only the tokens that enter get their context written."""
        into = {name: state["sample." + name][li] for name in ("priority", "value", "doc", "pos", "tokens")}
        merge_samples(chosen, a.numpy(), batch.priority, batch.doc_np, batch.pos_np, batch.docl, batch.doc_tokens,
                      batch.doc_offset, self.cfg.context[0], self.cfg.width, into)

    # -- MoE ----------------------------------------------------------------------------------------
    def _moe_callback(self, batch: _Batch, part: dict):
        lm, cfg = self.lm, self.cfg
        row_of = {layer: i for i, layer in enumerate(cfg.moe_layers)}

        def callback(layer, probs, experts, gates, hidden):
            i = row_of[layer]
            p, e, g = probs[batch.rows], experts[batch.rows], gates[batch.rows]
            h = hidden.reshape(-1, hidden.shape[-1])[batch.rows]
            N, E = p.shape
            part["route.tokens"][i] = N
            part["route.load"][i] = torch.bincount(e.reshape(-1), minlength=E)[:E].numpy()
            part["route.gate_mass"][i] = torch.zeros(E, dtype=torch.float64).index_add_(0, e.reshape(-1), g.reshape(-1).double()).numpy()
            part["route.prob_mass"][i] = p.double().sum(0).numpy()
            part["route.entropy_sum"][i] = float(-(p.double() * torch.log(p.double().clamp_min(1e-300))).sum())
            gate_e = torch.full((E, N), -torch.inf)
            gate_e.scatter_(0, e.T, g.T.float())  # [E, N]: the gate of each token at each expert (−inf: not routed)
            part["route.gate.max"][i] = gate_e.max(1).values.clamp_min(0).numpy()
            k = cfg.top_k
            docs = batch.doc[None].expand(E, N).numpy()
            poss = batch.pos[None].expand(E, N).numpy()
            from lens.scan.reducers import topk_order

            order = topk_order(gate_e.numpy(), docs, poss)[:, :k]
            sel_v = np.take_along_axis(gate_e.numpy(), order, 1)
            live = np.isfinite(sel_v)
            w = order.shape[1]
            part["route_topk.value"][i, :, :w] = np.where(live, sel_v, -np.inf)
            part["route_topk.doc"][i, :, :w] = np.where(live, np.take_along_axis(docs, order, 1), EMPTY_DOC)
            part["route_topk.pos"][i, :, :w] = np.where(live, np.take_along_axis(poss, order, 1), 0)
            flat_ids = batch.ids.reshape(-1)[batch.rows].numpy()
            part["route_topk.token"][i, :, :w] = np.where(live, flat_ids[order], -1)
            experts_module = lm.expert_modules[layer]
            for expert in range(E):
                routed = (e == expert).any(-1)
                n = int(routed.sum())
                if n == 0:
                    continue
                act = expert_activations(experts_module, h[routed], expert).double()
                mean = act.mean(0)
                part["expert_neuron.count"][i, expert] = n
                part["expert_neuron.mean"][i, expert] = mean.numpy()
                part["expert_neuron.m2"][i, expert] = (act - mean).square().sum(0).numpy()
                part["expert_neuron.max"][i, expert] = act.max(0).values.float().numpy()
                part["expert_neuron.positive"][i, expert] = (act > 0).sum(0).numpy()

        return callback

    # -- attention and residual, per window -----------------------------------------------------------
    def _sequence_stats(self, run, part: dict) -> None:
        cfg = self.cfg
        s = sinks(run, epsilon=cfg.epsilon, tau=cfg.tau)
        score = s.sink_score  # [S, L, H]
        S = score.shape[0]
        u0 = np.array([uniform_share(int(n), run.causal)[0] for n in run.lengths])
        part["sink.count"][:] = S
        mean = score.mean(0)
        part["sink.mean"][:] = mean
        part["sink.m2"][:] = ((score - mean) ** 2).sum(0)
        bins = np.clip((score * SEQ_BINS).astype(np.int64), 0, SEQ_BINS - 1)
        for b in range(SEQ_BINS):
            part["sink.hist"][..., b] = (bins == b).sum(0)
        is_sink = (score >= cfg.epsilon) & (score >= 2 * u0[:, None, None])
        part["sink.rate_sum"][:] = is_sink.mean(2).sum(0)
        v = valley(run)
        for c, name in enumerate(("entropy_raw_normalized", "entropy_normalized_normalized")):
            vals = v.values[name]  # [L+1, S]
            ok = np.isfinite(vals)
            n = ok.sum(1)
            safe = np.where(ok, vals, 0.0)
            m = np.divide(safe.sum(1), n, out=np.zeros(len(n)), where=n > 0)
            part["seq.count"][:, c] = n
            part["seq.mean"][:, c] = m
            part["seq.m2"][:, c] = np.where(ok, (vals - m[:, None]) ** 2, 0.0).sum(1)
            part["seq.min"][:, c] = np.where(ok, vals, np.inf).min(1)
            part["seq.max"][:, c] = np.where(ok, vals, -np.inf).max(1)
            hb = np.clip((np.where(ok, vals, 0) * SEQ_BINS).astype(np.int64), 0, SEQ_BINS - 1)
            for b in range(SEQ_BINS):
                part["seq.hist"][:, c, b] = ((hb == b) & ok).sum(1)
        top = np.abs(run.arrays["resid.top_value"])  # [L+1, S, K]
        med = run.arrays["resid.median_abs"][..., None]
        ratio = top / np.maximum(med, 1e-30)
        massive = (top > cfg.massive_abs) & (ratio > cfg.massive_rel)
        part["massive.entries"][:] = massive.sum((1, 2))
        part["massive.windows"][:] = massive.any(2).sum(1)
        part["massive.ratio.max"][:] = ratio.max((1, 2))

    def _token_flags(self, run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer and flat token: attention mass received (mean over heads), sink flag, massive ratio."""
        cfg = self.cfg
        key_mass = run.arrays["attn.key_mass"].astype(np.float64)  # [L, H, n]
        count = run.arrays["attn.query_count"][:, None, :].astype(np.float64)
        mass = np.divide(key_mass, count, out=np.zeros_like(key_mass), where=count > 0)
        u = np.concatenate([uniform_share(int(n), run.causal) for n in run.lengths])
        sink = (mass > cfg.tau * u).any(1)
        ratio = np.zeros((run.arrays["resid.top_value"].shape[0], key_mass.shape[2]), dtype=np.float32)
        top = np.abs(run.arrays["resid.top_value"])  # [L+1, S, K]
        where = run.arrays["resid.top_position"]
        med = np.maximum(run.arrays["resid.median_abs"][..., None], 1e-30)
        flat = run.offsets[:-1][None, :, None] + where
        valid = where >= 0
        layer_idx = np.broadcast_to(np.arange(top.shape[0])[:, None, None], top.shape)
        np.maximum.at(ratio, (layer_idx[valid], flat[valid]), (top / med)[valid].astype(np.float32))
        return mass.mean(1).astype(np.float32), sink, ratio

    def _attach_flags(self, run, batch: _Batch, part: dict) -> None:
        if not self._pending:
            return
        mass, sink, ratio = self._token_flags(run)
        T = batch.ids.shape[1]
        flat_of = np.full(batch.ids.numel(), 0, dtype=np.int64)
        flat_of[batch.rows.numpy()] = batch.flat
        for kind, li, rows, live in self._pending:
            layer = self.cfg.layers[li]
            f = flat_of[rows]
            part["topk.mass"][li] = np.where(live, mass[layer][f], 0)
            part["topk.sink"][li] = np.where(live, sink[layer][f], 0).astype(np.uint8)
            part["topk.massive"][li] = np.where(live, ratio[layer][f], 0)
        self._pending = []
