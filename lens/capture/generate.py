"""``lens.generate``: decoding traced on the deployed path — the model's own ``generate`` with its KV cache.

``lens.trace`` runs whole sequences without a cache; a decoder is deployed by *generating*, one token at a
time against cached keys and values. ``lens.generate`` runs the model's own ``generate`` (greedy or
sampling, seeded) through the lens attention function, so the probes see every decoding step exactly as
the deployed kernels compute it, with the full cache or a StreamingLLM cache (``lens.StreamingCache``).

The Run it returns holds the prompt and the generated tokens, with

* the usual arrays over every token (``attn.key_mass``/``attn.query_count`` summed over the queries that
  really saw each key — with a streaming cache, evicted keys receive nothing — and the residual
  statistics, norms, massive activations and spectra of the hidden states the decoding path computed),
  so ``lens.sinks`` and ``lens.valley`` work on it;
* per-step arrays ``gen.*`` (step j feeds generated token j at position P + j, P = prompt length):

  ============================  ============  =======================================================
  array                         shape         meaning
  ============================  ============  =======================================================
  ``gen.offsets``               [S+1]         steps of sequence s: ``gen.offsets[s]:gen.offsets[s+1]``
  ``gen.position``              [M] int64     position of the step's query (= of the token it feeds)
  ``gen.visible``               [M] int64     keys the step's query could attend (the cache size + 1)
  ``gen.first_mass``            [L, H, M]     attention the new query puts on the first token
  ``gen.sink_mass``             [L, H, M]     … on the first ``sink_tokens`` tokens (StreamingLLM: 4)
  ``gen.window_mass``           [L, H, M]     … on the ``recent`` most recent tokens (itself included)
  ``gen.top_value``/``top_dim``  [L+1, M]     the new token's largest-|x| residual entry and its dim
  ``gen.median_abs``            [L+1, M]      median |x| of the new token's residual vector
  ``gen.logprobs``              [M, V] f32    log-softmax of the logits that chose generated token j
  ``gen.chosen_logprob``        [M]           … at the chosen token
  ============================  ============  =======================================================

Example::

    lm = lens.load("smollm2")
    full = lens.generate(lm, "The capital of France is", 20)
    stream = lens.generate(lm, "The capital of France is", 20, cache=lens.StreamingCache(4, 8), force=full)
    lens.decoding(stream, baseline=full).to_frame()
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import torch

from lens.capture.probes import Batch, ResidualProbe
from lens.capture.trace import _input_hash, _pad_id, lm_has_head
from lens.errors import ConfigError
from lens.models.kvcache import StreamingCache, full_cache
from lens.models.inputs import encode
from lens.models.observers import observing
from lens.progress import progress_bar
from lens.run import Run

__all__ = ["generate"]


class _Recorder:
    """Observes one sequence's decoding: attention rows per step, and every fed token's hidden states."""

    def __init__(self, lm, cache: StreamingCache | None, total: int, sink_tokens: int, recent: int):
        self.lm, self.cache, self.sink_tokens, self.recent = lm, cache, sink_tokens, recent
        L, H = lm.n_layers, lm.n_heads
        self.key_mass = np.zeros((L, H, total), np.float64)
        self.query_count = np.zeros((L, total), np.float64)
        self.hidden: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
        self.steps: list[dict] = []  # one per decode forward
        self.fed = 0  # tokens fed so far (= position of the next query)
        self.handles: list = []

    # attention: fed by the lens attention function
    def pattern_heads(self, module) -> tuple[int, ...]:
        return ()

    def on_attention(self, module, stats) -> None:
        layer = self.lm.layer_of_attention.get(id(module))
        if layer is None:
            return
        q_len = int(stats.query_valid.shape[1])
        k_len = int(stats.key_mass.shape[-1])
        end = self.fed + q_len - 1  # position of the last query of this forward
        if self.cache is not None:
            positions = self.cache.slot_positions(k_len, end).numpy()
        else:
            positions = np.arange(end - k_len + 1, end + 1)
        mass = stats.key_mass[0].double().cpu().numpy()  # [H, Tk]
        self.key_mass[layer][:, positions] += mass
        self.query_count[layer, positions] += stats.query_count[0].double().cpu().numpy()
        if q_len == 1:  # a decode step: key_mass is the new query's attention row
            step = self.steps[-1]
            step["visible"] = k_len
            step["first"][layer] = mass[:, positions == 0].sum(1)
            step["sink"][layer] = mass[:, positions < self.sink_tokens].sum(1)
            step["window"][layer] = mass[:, positions > end - self.recent].sum(1)

    # every forward of the backbone: a decode step begins when something was fed before
    def _forward_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self._q = int((ids if ids is not None else embeds).shape[1])
        if self.fed > 0:
            self.new_step()

    def _forward_post(self, module, args, kwargs, output):
        self.fed += self._q

    # residual stream: forward hooks
    def attach(self) -> None:
        self.handles.append(self.lm.base.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
        self.handles.append(self.lm.base.register_forward_hook(self._forward_post, with_kwargs=True))
        for layer, block in enumerate(self.lm.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(layer), with_kwargs=True))
        self.handles.append(self.lm.blocks[-1].register_forward_hook(self._post(self.lm.n_layers)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, layer):
        def hook(module, args, kwargs):
            self._keep(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def _post(self, layer):
        def hook(module, args, output):
            self._keep(layer, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def _keep(self, layer: int, hidden: torch.Tensor) -> None:
        x = hidden[0].detach().float().cpu()
        if not bool(torch.isfinite(x).all()):
            from lens.errors import NumericalError

            where = "the final hidden state" if layer == self.lm.n_layers else f"the input of block {layer}"
            raise NumericalError(f"{where} became NaN or infinite during generation at position {self.fed}; "
                                 "load the model with dtype='float32' and check its weights")
        self.hidden[layer].append(x)
        if x.shape[0] == 1 and self.steps:
            step = self.steps[-1]
            value = x[0]
            j = int(value.abs().argmax())
            step["top_value"][layer], step["top_dim"][layer] = float(value[j]), j
            step["median"][layer] = float(value.abs().median())

    def new_step(self) -> None:
        L, H = self.lm.n_layers, self.lm.n_heads
        nan = np.full((L, H), np.nan)
        self.steps.append({"position": self.fed, "visible": 0, "first": nan.copy(), "sink": nan.copy(),
                           "window": nan.copy(), "top_value": np.full(L + 1, np.nan), "top_dim": np.full(L + 1, -1),
                           "median": np.full(L + 1, np.nan)})


def _check(lm, max_new_tokens, cache, force, recent, sink_tokens):
    if not lm.causal or not lm_has_head(lm):
        raise ConfigError(f"lens.generate needs a causal language model with an LM head; {lm.model_id} is not one")
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens must be ≥ 1; got {max_new_tokens}")
    if cache is not None and not isinstance(cache, StreamingCache):
        raise ConfigError(f"cache must be None (the full cache) or a lens.StreamingCache; got {type(cache).__name__}")
    if int(recent) < 1 or int(sink_tokens) < 1:
        raise ConfigError("recent and sink_tokens must be ≥ 1")
    if force is not None and (not isinstance(force, Run) or "gen.offsets" not in force.arrays):
        raise ConfigError("force must be a Run returned by lens.generate (its generated tokens are fed again)")


@torch.inference_mode()
def generate(
    model,
    prompts,
    max_new_tokens: int = 32,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    cache: StreamingCache | None = None,
    force: Run | None = None,
    recent: int = 64,
    sink_tokens: int = 4,
    top_k_massive: int = 10,
    progress: bool | None = None,
) -> Run:
    """Generate from ``prompts`` with the model's own ``generate`` and KV cache, tracing every step.

    ``model``: a ``LensModel`` of a causal LM. ``prompts``: a string or a list (each generated separately,
    batch size 1, so no padding enters the cache). ``do_sample``/``temperature``/``top_k``/``top_p``:
    as in transformers' ``generate``; ``torch.manual_seed(seed)`` is set before each prompt, so greedy
    and sampled runs are reproducible and equal HF ``generate`` under the same seed. ``cache``: None
    (the full cache) or ``lens.StreamingCache(sink_tokens, window)``. ``force``: a Run from
    ``lens.generate`` whose generated tokens are fed instead of choosing (teacher forcing: compare two
    caches on the same text with ``lens.decoding(run, baseline=force)``). ``recent`` and ``sink_tokens``
    define the per-step window and sink masses. Returns a ``Run`` (see the module docstring for the
    ``gen.*`` arrays). Raises ``ConfigError`` for a model without an LM head or bad options.

    Example::

        run = lens.generate(lm, ["The capital of France is"], 16)
        run.texts[0], "".join(run.tokens[0][int(run.arrays["gen.position"][0]):])
    """
    lm = model
    _check(lm, max_new_tokens, cache, force, recent, sink_tokens)
    encoded = encode(lm, prompts)
    if force is not None and force.n_sequences != len(encoded.ids):
        raise ConfigError(f"force has {force.n_sequences} sequences but there are {len(encoded.ids)} prompts")
    sequences, recorders, logprobs = [], [], []
    for s, prompt in enumerate(progress_bar(encoded.ids, progress=progress, desc="lens.generate", unit="prompt")):
        forced = None
        if force is not None:
            forced = _forced_tokens(force, s, prompt)
        ids, recorder, lp = _generate_one(lm, prompt, max_new_tokens, forced, cache, recent, sink_tokens,
                                          dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p),
                                          seed)
        sequences.append(ids)
        recorders.append(recorder)
        logprobs.append(lp)
    return _assemble(lm, encoded, sequences, recorders, logprobs, top_k_massive, dict(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
        top_k=top_k, top_p=top_p, seed=int(seed), recent=int(recent), sink_tokens=int(sink_tokens),
        cache=cache.describe() if cache is not None else {"kind": "full", "class": "transformers.DynamicCache"},
        forced=force is not None,
    ))


def _forced_tokens(force: Run, s: int, prompt: list[int]) -> list[int]:
    span = force.span(s)
    ids = [int(t) for t in force.arrays["token_ids"][span]]
    start = int(force.arrays["gen.position"][int(force.arrays["gen.offsets"][s])])
    if ids[:start] != list(prompt):
        raise ConfigError(f"force sequence {s} starts with a different prompt; force a run of the same prompts")
    return ids[start:]


def _generate_one(lm, prompt, max_new_tokens, forced, cache, recent, sink_tokens, sampling, seed):
    hf = lm.model
    device = lm.device
    P = len(prompt)
    budget = P + (len(forced) if forced is not None else int(max_new_tokens))
    recorder = _Recorder(lm, cache, budget, sink_tokens, recent)
    cache_obj = cache.build(lm.n_layers) if cache is not None else full_cache(hf.config)
    input_ids = torch.tensor([prompt], device=device)
    step_logits: list[torch.Tensor] = []
    recorder.attach()
    try:
        with observing(recorder):
            if forced is None:
                torch.manual_seed(seed)
                kwargs = {k: v for k, v in sampling.items() if v is not None} if sampling["do_sample"] else {"do_sample": False}
                out = hf.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=int(max_new_tokens),
                    cache=cache_obj, use_cache=True, return_dict_in_generate=True, output_logits=True,
                    pad_token_id=_pad_id(lm.tokenizer), **kwargs,
                )
                new = out.sequences[0, P:].tolist()
                step_logits = [x[0].float() for x in out.logits]
                # generate stops before feeding its last token; feed it, so every token has its statistics
                hf(input_ids=out.sequences[:, -1:], cache=cache_obj, use_cache=True)
            else:
                new = list(forced)
                out = hf(input_ids=input_ids, cache=cache_obj, use_cache=True)
                step_logits.append(out.logits[0, -1].float())
                for j, token in enumerate(new):
                    out = hf(input_ids=torch.tensor([[token]], device=device), cache=cache_obj, use_cache=True)
                    if j + 1 < len(new):
                        step_logits.append(out.logits[0, -1].float())
    finally:
        recorder.detach()
    lp = torch.stack([torch.log_softmax(x, -1) for x in step_logits]).cpu().numpy() if step_logits else None
    return list(prompt) + new, recorder, lp


def _assemble(lm, encoded, sequences, recorders, logprobs, top_k_massive, settings) -> Run:
    """The Run of a generation: the usual arrays over every token, plus the per-step ``gen.*`` arrays."""
    lengths = np.array([len(x) for x in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens, n_seq = int(offsets[-1]), len(sequences)
    L, H = lm.n_layers, lm.n_heads
    key_mass = np.zeros((L, H, n_tokens), np.float32)
    query_count = np.zeros((L, n_tokens), np.float32)
    residual = ResidualProbe(lm, n_tokens, n_seq, int(lengths.max()), top_k_massive, ())
    for s, rec in enumerate(recorders):
        n, start = int(lengths[s]), int(offsets[s])
        key_mass[:, :, start : start + n] = rec.key_mass[:, :, :n]
        query_count[:, start : start + n] = rec.query_count[:, :n]
        residual.begin(Batch(sequences=[s], lengths=[n], starts=[start], flat_index=torch.arange(start, start + n),
                             mask=torch.ones(1, n, dtype=torch.bool)))
        for layer in range(L + 1):
            residual.observe(layer, torch.cat(rec.hidden[layer])[None])
    steps = [step for rec in recorders for step in rec.steps]
    step_offsets = np.concatenate([[0], np.cumsum([len(rec.steps) for rec in recorders])]).astype(np.int64)
    stack = lambda key: np.stack([st[key] for st in steps], axis=-1) if steps else None  # noqa: E731
    arrays: dict[str, np.ndarray] = {
        "token_ids": np.concatenate([np.asarray(x, np.int64) for x in sequences]),
        "offsets": offsets,
        "special": np.isin(np.concatenate([np.asarray(x, np.int64) for x in sequences]),
                           np.asarray(sorted(getattr(lm.tokenizer, "all_special_ids", []) or [-1]), np.int64)),
        "attn.key_mass": key_mass,
        "attn.query_count": query_count,
        **residual.arrays(),
        "gen.offsets": step_offsets,
        "gen.position": np.array([st["position"] for st in steps], np.int64),
        "gen.visible": np.array([st["visible"] for st in steps], np.int64),
        "gen.first_mass": stack("first").astype(np.float32),
        "gen.sink_mass": stack("sink").astype(np.float32),
        "gen.window_mass": stack("window").astype(np.float32),
        "gen.top_value": stack("top_value").astype(np.float32),
        "gen.top_dim": stack("top_dim").astype(np.int64),
        "gen.median_abs": stack("median").astype(np.float32),
    }
    chosen = []
    for s, lp in enumerate(logprobs):
        new = sequences[s][len(sequences[s]) - (step_offsets[s + 1] - step_offsets[s]):]
        chosen.extend(float(lp[j, t]) for j, t in enumerate(new))
    arrays["gen.logprobs"] = np.concatenate(logprobs).astype(np.float32)
    arrays["gen.chosen_logprob"] = np.asarray(chosen, np.float32)
    provenance = lm.provenance()
    provenance.update({
        "input_sha256": _input_hash(sequences),
        "prompt_sha256": _input_hash(encoded.ids),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trace": {"capture": ["attention", "residual"], "batch_size": 1, "padding": "none",
                  "prepend_bos": lm.family.prepend_bos, "truncate": False, "top_k_massive": int(top_k_massive),
                  "keep_patterns": [], "keep_hidden": [], "interventions": []},
        "generate": settings,
    })
    meta = {
        "n_layers": L, "n_heads": H, "n_kv_heads": lm.n_kv_heads, "d_model": lm.d_model, "d_mlp": lm.d_mlp,
        "causal": True, "provenance": provenance, "texts": list(encoded.texts) + [],
        "truncated": [False] * n_seq, "tracked_neurons": [],
    }
    tokens = [[lm.tokenizer.decode([t]) for t in seq] for seq in sequences]
    return Run(arrays=arrays, tokens=tokens, meta=meta)
