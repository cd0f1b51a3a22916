"""``lens bench visual``: interpretability of the demo VLM's image tokens on a known answer
(docs/definitions.md, "Automatic interpretability of visual tokens").

What it does, in one run:

1. builds (or loads from lens's cache) a ``lens.TextBank`` of the embedded SmolLM2 — the demo VLM's frozen
   language model — over ``lens.analysis.textbank.sample_corpus()`` (5,000 sentences of the latentlens package's concepts corpus),
   at most 20 contexts per token type and layer, with the logit/embedding-lens tables;
2. captions nothing: it runs the demo VLM (``lens.models.toyvlm``, a real ``LlavaForConditionalGeneration``)
   once per held-out generated scene (seed ``EVAL_SEED``, stream 1 — never seen in training) with
   ``output_hidden_states=True`` and reads its 36 image tokens (``input_ids == image_token_id``) at each layer;
3. reads every object token (a patch the shape covers by at least ``--min-coverage`` of its pixels) with
   LatentLens (exact search, global top-5 over the bank layers), the embedding lens and the logit lens, and
   reports the fraction interpretable per method and layer;
4. the control: the same search over the bank with its token labels shuffled within each layer, beside the
   chance level computed from the bank's label frequencies;
5. with ``--quant`` (default ``int4``): the same readings with the VLM's language model quantized by lens's
   codecs (``lens.kernels.lowbit.quantize_model``) against the same dense bank.

Run: ``lens bench visual`` (``--scenes 24 --json bench-visual.json``; ``--quick`` for a smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

LAYERS = (2, 4, 6, 8, 12, 16, 20, 24)
QUICK = {"scenes": 4, "sentences": 400, "layers": (4, 12), "quant": None}


def demo_bank(lm, *, sentences: int = 5000, layers=LAYERS, cap: int = 20, seed: int = 0, cache: Path | None = None,
              progress: bool | None = None):
    """The text bank of ``lm`` over the first ``sentences`` of ``sample_corpus()``, cached in lens's cache dir."""
    from lens.analysis.textbank import TextBank, sample_corpus
    from lens.errors import BankFormatError
    from lens.models.cache import cache_dir

    texts = sample_corpus()[:sentences]
    key = hashlib.sha256(json.dumps({
        "signature": lm.provenance().get("signature"), "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "layers": sorted(int(x) for x in layers), "cap": cap, "seed": seed, "schema": "lens.textbank/1",
    }, sort_keys=True).encode()).hexdigest()[:16]
    folder = (cache or cache_dir()) / "banks" / f"visual-demo-{key}"
    if (folder / "bank.json").is_file():
        try:
            return TextBank.load(folder), "cached"
        except BankFormatError:
            pass
    bank = TextBank.build(lm, texts, layers, per_type_cap=cap, seed=seed, progress=progress,
                          corpus_name="lens sample of the LatentLens concepts corpus")
    bank.save(folder)
    return bank, f"built in {bank.meta['build_seconds']:.0f} s"


@torch.inference_mode()
def scene_states(model, processor, scenes, layers, *, min_coverage: float = 0.25):
    """Hidden states of the image tokens of ``scenes`` and what each covers.

    Returns ``(states, tokens, words)``: ``states[ℓ]`` float32 ``[n, d]`` (X_ℓ, the input of block ℓ, as
    ``output_hidden_states`` gives it), ``tokens`` the dict of arrays ``lens.visual_tokens`` reads, and
    ``words[i]`` the words naming token i's object (empty when the patch holds less than ``min_coverage``).
    """
    from lens.models import toyvlm

    image_id = int(model.config.image_token_id)
    states = {int(x): [] for x in layers}
    meta = {name: [] for name in ("token", "sequence", "position", "image", "tile", "row", "col")}
    words: list[set[str]] = []
    grid = toyvlm.GRID
    for s, scene in enumerate(scenes):
        inputs = processor(images=scene.image, text=toyvlm.prompt_text(), return_tensors="pt")
        out = model(**inputs, output_hidden_states=True)
        pos = torch.nonzero(inputs["input_ids"][0] == image_id).flatten().numpy()
        for layer in states:
            states[layer].append(out.hidden_states[layer][0, pos].float().numpy())
        cells = np.arange(len(pos))
        meta["token"].append(pos)
        meta["sequence"].append(np.full(len(pos), s))
        meta["position"].append(pos)
        meta["image"].append(np.full(len(pos), s))
        meta["tile"].append(np.zeros(len(pos), dtype=np.int64))
        meta["row"].append(cells // grid)
        meta["col"].append(cells % grid)
        answer = scene.words()
        words += [answer if scene.coverage[c // grid, c % grid] >= min_coverage else set() for c in cells]
    return ({k: np.concatenate(v) for k, v in states.items()}, {k: np.concatenate(v) for k, v in meta.items()}, words)


def run(*, scenes: int = 24, sentences: int = 5000, layers=LAYERS, quant: str | None = "int4", k: int = 5,
        min_coverage: float = 0.25, progress: bool | None = None) -> dict:
    import lens
    from lens.analysis.interpretability import interpretability
    from lens.analysis.visual_tokens import VisualTokens
    from lens.models import toyvlm
    from lens.models.toyvlm.evaluate import EVAL_SEED

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    started = time.perf_counter()
    lm = lens.load("smollm2")
    bank, how = demo_bank(lm, sentences=sentences, layers=layers, progress=progress)
    model, processor = toyvlm.load()
    model.eval()
    chosen = toyvlm.make_scenes(scenes, EVAL_SEED, stream=1)
    states, tokens, words = scene_states(model, processor, chosen, layers, min_coverage=min_coverage)
    dense = VisualTokens.from_states(states, tokens, bank, k=k)
    results = {"dense": interpretability(dense, words, label="dense LM")}
    control = VisualTokens.from_states(states, tokens, bank.shuffled_labels(seed=0), k=k, baselines=False)
    results["control"] = interpretability(control, words, label="LatentLens, shuffled bank labels (control)")
    if quant:
        from lens.kernels.lowbit import quantize_model

        report = quantize_model(model.model.language_model, quant, progress=False)
        q_states, _, _ = scene_states(model, processor, chosen, layers, min_coverage=min_coverage)
        results[quant] = interpretability(VisualTokens.from_states(q_states, tokens, bank, k=k), words,
                                          label=f"LM quantized {quant} ({report['n_replaced']} layers)")
    frames = [r.to_frame() for r in results.values()]
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    return {
        "bank": repr(bank), "bank_source": how, "scenes": scenes, "object_tokens": int(sum(1 for w in words if w)),
        "min_coverage": min_coverage, "k": k, "chance": results["dense"].chance,
        "table": frame.to_dict(orient="records"), "results": results, "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench visual", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--sentences", type=int, default=5000)
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)))
    parser.add_argument("--quant", default="int4", help="a lens scheme for the quantized LM, or 'none'")
    parser.add_argument("--min-coverage", type=float, default=0.25)
    parser.add_argument("--json", type=Path, default=Path("bench-visual.json"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    options = dict(scenes=args.scenes, sentences=args.sentences, layers=tuple(int(x) for x in args.layers.split(",")),
                   quant=None if args.quant == "none" else args.quant, min_coverage=args.min_coverage)
    if args.quick:
        options.update(QUICK)
    out = run(**options)
    for name, result in out["results"].items():
        print(f"\n{name}: {result!r}")
        print(result.table().map(lambda v: f"{v:.0%}").to_string())
    print(f"\nLatentLens chance (top-{out['k']} from the bank's label frequencies): {out['chance']:.1%}; "
          f"{out['object_tokens']} object tokens in {out['scenes']} held-out scenes; {out['bank']} ({out['bank_source']}); "
          f"{out['seconds']} s")
    from lens.atomic import atomic_write_text

    saved = {k: v for k, v in out.items() if k != "results"}
    atomic_write_text(args.json, json.dumps(saved, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
