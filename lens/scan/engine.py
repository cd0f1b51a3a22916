"""Engines that run shards: in this process (``"local"``) or on a Ray cluster (``"ray"``).

Both cut the corpus into the same shards of ``shard_size`` documents, run each shard with
:class:`lens.scan.worker.ShardWorker`, and merge the partial states *in shard order* in the driver, so the
two engines (and a resumed scan) produce identical states. Memory stays bounded: the driver holds the merged
state, the shards in flight and nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import time
from typing import Any, Callable, Iterator

import numpy as np

from lens.errors import ConfigError, MissingDependencyError, ScanError
from lens.scan.reducers import merge_state

__all__ = ["shards", "run_local", "run_ray", "model_spec"]


def shards(corpus, size: int, skip: int = 0, check: Callable[[int, list], None] | None = None) -> Iterator[tuple[int, list]]:
    """``(shard index, [(doc id, text), ...])`` in order; the first ``skip`` shards go to ``check`` only."""
    iterator = iter(corpus)
    for index in itertools.count():
        docs = list(itertools.islice(iterator, size))
        if not docs:
            return
        if index < skip:
            if check is not None:
                check(index, docs)
            continue
        yield index, docs


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    A scan allocates large temporaries of every size (batches of 8 windows of 20 to 512 tokens); glibc keeps
    their freed pages and the heap fragments, so peak RSS crept up with the corpus (1.22× from 10⁴ to 10⁵
    tokens on MiniLM) while lens's own data did not grow. Trimming after every batch and shard keeps it at
    1.02–1.05× for 0.6 % of the scan's time — the practice Dask and Ray workers use for the same reason; no
    Python library wraps it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_local(worker, shard_iter, state, on_shard, progress) -> dict[str, np.ndarray]:
    """Run every shard here; ``on_shard(state, info)`` checkpoints after each."""
    cfg = worker.cfg
    for index, docs in shard_iter:
        part, info = worker.run_shard(index, docs, progress=progress)
        state = merge_state(state, part, top_k=cfg.top_k, samples=cfg.samples, inplace=True)
        del part
        on_shard(state, info)
        release_free_memory()
    return state


def model_spec(lm) -> dict[str, Any]:
    """What a Ray actor needs to load the same model: where it came from and how it is deployed."""
    if lm.source not in ("embedded", "folder", "hub"):
        raise ConfigError(
            f"engine='ray' reloads the model in every worker, but this model was given as a {lm.source} object; "
            "pass lens.load('<folder or hub id>') (or the folder itself) so that workers can load it"
        )
    if lm.quant is not None and getattr(lm.quant, "smooth_alpha", None) is not None:
        raise ConfigError("engine='ray' cannot reproduce SmoothQuant calibration in the workers; use engine='local'")
    return {
        "model": None if lm.source == "embedded" else lm.model_id,
        "attention": lm.attention_kernel,
        "quant": lm.quant,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "revision": lm.revision if lm.source == "hub" else None,
    }


def _load_spec(spec: dict[str, Any]):
    from lens.models.load import load

    kwargs = {"attention": spec["attention"] or "dense", "quant": spec["quant"], "dtype": spec["dtype"]}
    if spec["model"] is None:
        return load(**kwargs)
    return load(spec["model"], revision=spec.get("revision"), **kwargs)


class _ShardActor:
    """A Ray Data actor: loads the model once, then turns one shard per call into a partial state.

    States cross the process boundary as safetensors bytes (arrays and JSON only).
    """

    def __init__(self, spec: dict[str, Any], cfg_json: dict[str, Any], threads: int):
        import torch

        torch.set_num_threads(threads)
        from lens.scan.config import ScanConfig
        from lens.scan.worker import ShardWorker

        cfg_json = dict(cfg_json)
        for key in ("layers", "context", "moe_layers", "interventions"):
            cfg_json[key] = tuple(cfg_json.get(key, ()))
        self.worker = ShardWorker(_load_spec(spec), ScanConfig(**cfg_json))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        from safetensors.numpy import save

        out_state, out_info, out_shard = [], [], []
        for index, docs_json in zip(batch["shard"], batch["docs"]):
            docs = [(int(d), t) for d, t in json.loads(docs_json)]
            state, info = self.worker.run_shard(int(index), docs)
            out_state.append(save({k: np.ascontiguousarray(v) for k, v in state.items()}))
            out_info.append(json.dumps(info))
            out_shard.append(int(index))
            del state
            release_free_memory()
        return {"shard": np.asarray(out_shard), "state": np.asarray(out_state, dtype=object),
                "info": np.asarray(out_info, dtype=object)}


def run_ray(lm, cfg, shard_iter, state, on_shard, progress, *, address: str | None, workers: int,
            threads: int, window: int | None = None) -> dict[str, np.ndarray]:
    """Run shards on Ray Data: ``map_batches`` over an actor pool (one model per actor), one shard per batch.

    Shards are submitted ``window`` at a time (default 64 × workers) so the driver never holds more than that
    many; results are merged and checkpointed in shard order. ``address``: an existing cluster
    (``"auto"``, ``"ray://host:10001"``); None starts or reuses a local one.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingDependencyError(
            f"engine='ray' needs Ray Data ({exc}); install it with pip install 'lens-interp[scan]'"
        ) from exc
    import json

    from safetensors.numpy import load as load_state

    if not ray.is_initialized():
        import os

        # a busy machine can take > 30 s to start Ray's metrics agent; the raylet would otherwise give up first
        os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    spec = model_spec(lm)
    cfg_json = cfg.to_json()
    # Every window is one Dataset and one actor pool, i.e. one model load per actor: a wide window keeps the
    # loads rare (it was 2 × workers shards — a load per actor every two shards each), while the driver still
    # holds only the window's texts (shard_size documents each), never the corpus. Partial states are merged as
    # they stream out in shard order (preserve_order), so at most a few are held at once.
    window = window or 64 * workers
    pending = list(itertools.islice(shard_iter, window))
    while pending:
        items = [{"shard": index, "docs": json.dumps(docs)} for index, docs in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = ds.map_batches(
            _ShardActor, fn_constructor_args=(spec, cfg_json, threads), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))), num_cpus=threads,
            batch_format="numpy",
        )
        order = iter([index for index, _ in pending])
        expected = next(order, None)
        early = {}  # results that arrive before their turn (none when the order is preserved)
        for row in results.iter_rows():
            early[int(row["shard"])] = (bytes(row["state"]), row["info"])
            while expected is not None and expected in early:  # merge in shard order
                raw, info_json = early.pop(expected)
                info = json.loads(info_json)
                state = merge_state(state, load_state(raw), top_k=cfg.top_k, samples=cfg.samples, inplace=True)
                if progress is not None:
                    progress(info["tokens"])
                on_shard(state, info)
                release_free_memory()
                expected = next(order, None)
        if expected is not None or early:
            raise ScanError(f"the Ray engine lost shard {expected}: its actors returned {sorted(early)} out of order "
                            "and never that one; run again (resume=True keeps the shards already checkpointed)")
        pending = list(itertools.islice(shard_iter, window))
    return state
