"""Held-out caption accuracy of the toy VLM: greedy captions, parsed, compared per attribute.

``python -m lens.models.toyvlm.evaluate [--n 96] [--seed 20261130] [--weights PATH] [--language-model DIR]``
builds (or reuses) the LLaVA folder, loads it with ``from_pretrained`` like any hub LLaVA, captions ``n``
fresh images (seed and stream differ from training's), and prints accuracy per attribute beside chance
(1/6 colour, 1/4 shape, 1/9 position) and as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data import COLOURS, POSITIONS, SHAPES, Scene, make_scenes, parse_caption
from .spec import prompt_text

EVAL_SEED = 20261130  # held-out images: this seed, stream 1 (training uses the training seed, streams >= 1000)
EVAL_STREAM = 1
ATTRIBUTES = ("colour", "shape", "position")
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}


def generate_captions(model, processor, images, *, batch_size: int = 16, max_new_tokens: int = 16) -> list[str]:
    """Greedy captions for PIL images with the toy VLM's prompt (``"Describe the image."``).

    Args:
        model: ``LlavaForConditionalGeneration`` (any dtype; eval mode is set by the caller).
        processor: its ``LlavaProcessor``.
        images: sequence of ``PIL.Image`` (96 × 96 RGB; other sizes are resized by the processor).
        batch_size: images per ``generate`` call (all prompts have the same length: no padding).
        max_new_tokens: generation budget; a caption is ~8 tokens + ``<|im_end|>``.

    Returns:
        list of decoded strings (special tokens removed, stripped), one per image.

    Example:
        >>> generate_captions(model, processor, [make_scene(0).image])   # doctest: +SKIP
        ['a blue square at the bottom right.']
    """
    text = prompt_text()
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1] :]
        out += [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def score(scenes: list[Scene], captions: list[str]) -> dict[str, Any]:
    """Per-attribute accuracy of captions against the scenes' truth (parsed with ``parse_caption``).

    Args:
        scenes: the ground truth.
        captions: one generated string per scene.

    Returns:
        ``{"n", "accuracy": {attr: float}, "exact": float, "chance": {attr: float}, "errors": [...]}``;
        ``errors`` lists up to 20 ``{"index", "truth", "generated"}`` for captions with any wrong attribute.

    Raises:
        ValueError: lengths differ.

    Example:
        >>> s = make_scenes(1)
        >>> score(s, [s[0].caption])["accuracy"]
        {'colour': 1.0, 'shape': 1.0, 'position': 1.0}
    """
    if len(scenes) != len(captions):
        raise ValueError(f"{len(scenes)} scenes but {len(captions)} captions")
    hits = {a: 0 for a in ATTRIBUTES}
    exact = 0
    errors = []
    for i, (scene, text) in enumerate(zip(scenes, captions)):
        parsed = parse_caption(text)
        ok = {a: parsed[a] == getattr(scene, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        exact += all(ok.values())
        if not all(ok.values()) and len(errors) < 20:
            errors.append({"index": i, "truth": scene.caption, "generated": text})
    n = max(len(scenes), 1)
    return {
        "n": len(scenes),
        "accuracy": {a: hits[a] / n for a in ATTRIBUTES},
        "exact": exact / n,
        "chance": dict(CHANCE),
        "errors": errors,
    }


def heldout_accuracy(model, processor, n: int = 96, seed: int = EVAL_SEED, *, batch_size: int = 16) -> dict[str, Any]:
    """Caption ``n`` held-out images (``make_scenes(n, seed, stream=1)``) and score them.

    Returns:
        :func:`score`'s dict plus ``"seed"``, ``"stream"`` and ``"seconds"``.

    Example:
        >>> heldout_accuracy(*load(), n=48)["accuracy"]          # doctest: +SKIP
        {'colour': 1.0, 'shape': 1.0, 'position': 1.0}
    """
    t0 = time.perf_counter()
    scenes = make_scenes(n, seed, stream=EVAL_STREAM)
    was_training = model.training
    model.eval()
    captions = generate_captions(model, processor, [s.image for s in scenes], batch_size=batch_size)
    model.train(was_training)
    result = score(scenes, captions)
    return {**result, "seed": seed, "stream": EVAL_STREAM, "seconds": round(time.perf_counter() - t0, 2)}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of accuracy vs chance per attribute.

    Example:
        >>> print(format_table({"n": 1, "accuracy": {"colour": 1, "shape": 1, "position": 1}, "exact": 1, "chance": CHANCE}))
        ... # doctest: +ELLIPSIS
        attribute  accuracy  chance
        ...
    """
    lines = ["attribute  accuracy  chance"]
    for a in ATTRIBUTES:
        lines.append(f"{a:<10} {result['accuracy'][a]:>8.3f}  {result['chance'][a]:.3f}")
    lines.append(f"{'all three':<10} {result['exact']:>8.3f}  {1 / (len(COLOURS) * len(SHAPES) * len(POSITIONS)):.4f}")
    lines.append(f"n = {result['n']} held-out images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring). Returns 0, or 1 when an attribute is below ``--min``."""
    parser = argparse.ArgumentParser(prog="python -m lens.models.toyvlm.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=96, help="held-out images (default 96)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help=f"held-out seed (default {EVAL_SEED})")
    parser.add_argument("--weights", type=Path, default=None, help="vision+projector safetensors (default: committed)")
    parser.add_argument("--language-model", type=Path, default=None, help="saved LM folder (default: SmolLM2 cache)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--min", type=float, default=0.0, help="exit 1 if any attribute's accuracy is below this")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .build import load

    model, processor = load(args.language_model, args.weights)
    result = heldout_accuracy(model, processor, args.n, args.seed)
    print(format_table(result))
    for err in result["errors"][:10]:
        print(f"  wrong: {err['generated']!r}  (truth {err['truth']!r})")
    text = json.dumps({k: v for k, v in result.items()}, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if min(result["accuracy"].values()) >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
