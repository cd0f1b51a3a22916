"""Train the toy VLM's vision tower + projector through the frozen SmolLM2 decoder (CPU, seeded).

``python -m lens.models.toyvlm.train --out DIR [--steps N] [--seed S] [--language-model DIR]`` writes

* ``DIR/weights.safetensors`` — vision tower + projector, fp16 (the only trained tensors, ~4.8 MB);
* ``DIR/toyvlm.json`` — the architecture/processor settings they belong to;
* ``DIR/training_log.json`` — steps, sampled loss curve, wall time, versions, seed, held-out accuracy.

Recipe, two stages, one seed:

1. *Vision pre-training* (``--pretrain-steps``, no language model, cheap): the CLIP vision tower learns the
   image's colour, shape and position through three linear heads (:class:`AttributeHeads`, discarded).
2. *Caption alignment* (``--steps``): each step draws a fresh batch (``make_scenes(batch, seed,
   stream=1000 + step)``), feeds ``prompt + caption + <|im_end|>`` and takes the next-token cross-entropy on
   the caption tokens only (prompt and image positions masked), plus ``aux_weight`` × the heads' loss. The
   decoder (all of SmolLM2, embeddings and head included) is frozen; gradients flow through it to the
   projected image tokens, training projector and vision tower together.

bf16 autocast on CPU, AdamW, linear warm-up then cosine decay to 0.1 × lr, gradient clipping at 1.0.
Same seed + same thread count → same weights. One thread by default: on a shared 2-core machine two
OpenMP threads were measured 7× slower per step than one (each parallel region waits for a descheduled peer).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .build import WEIGHTS_NAME, _gguf_sha256, assemble_model, load_trainable, trainable_state
from .data import COLOURS, POSITIONS, SHAPES, make_scenes
from .evaluate import EVAL_SEED, heldout_accuracy
from .spec import SPEC_NAME, default_spec, prompt_text

LOG_NAME = "training_log.json"
TRAIN_STREAM_BASE = 1000
PRETRAIN_STREAM_BASE = 100_000
# the recipe of the committed weights (training_log.json): `python -m lens.models.toyvlm.train --out DIR` repeats it
DEFAULTS = {"steps": 160, "batch_size": 16, "lr": 1.5e-3, "warmup": 20, "weight_decay": 0.01, "eval_images": 96,
            "pretrain_steps": 400, "pretrain_batch": 64, "aux_weight": 0.2}


def _batch(processor, prompt_ids: torch.Tensor, scenes, eos: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded ids [B, P + L], caption targets [B, L] (-100 = ignore), pixel values, prompt length P."""
    tok = processor.tokenizer
    captions = [tok(s.caption + eos, add_special_tokens=False)["input_ids"] for s in scenes]
    width = max(len(c) for c in captions)
    targets = torch.full((len(scenes), width), -100, dtype=torch.long)
    body = torch.full((len(scenes), width), tok.pad_token_id, dtype=torch.long)
    for i, c in enumerate(captions):
        targets[i, : len(c)] = torch.tensor(c)
        body[i, : len(c)] = torch.tensor(c)
    ids = torch.cat([prompt_ids.expand(len(scenes), -1), body], dim=1)
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    return ids, targets, pixels, prompt_ids.shape[1]


def caption_loss(model, ids: torch.Tensor, targets: torch.Tensor, pixels: torch.Tensor, prompt_len: int, return_vision: bool = False):
    """Mean next-token cross-entropy over caption tokens (the LM head runs on caption positions only).

    Args:
        model: ``LlavaForConditionalGeneration``.
        ids: [B, P + L] int64, prompt (with its image tokens) then right-padded caption.
        targets: [B, L] int64 caption ids, -100 where padded.
        pixels: [B, 3, H, W] float32 from the processor.
        prompt_len: P.
        return_vision: also return the vision tower's last hidden state [B, 1 + GRID**2, d].

    Returns:
        scalar float32 tensor (differentiable w.r.t. the vision tower and projector), or ``(loss, hidden)``.

    Example:
        >>> loss = caption_loss(model, *_batch(processor, prompt_ids, make_scenes(4), "<|im_end|>"))  # doctest: +SKIP
    """
    # right padding only follows real tokens, so the causal mask alone is exact: no attention_mask needed
    out = model.model(input_ids=ids, pixel_values=pixels)
    width = targets.shape[1]
    logits = model.lm_head(out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + width])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    if return_vision:
        return loss, out.image_outputs.last_hidden_state
    return loss


class AttributeHeads(torch.nn.Module):
    """Colour/shape/position classifiers on the vision tower's output (a training aid, not saved).

    Input: the vision tower's last hidden state [B, 1 + GRID**2, d].

    * image level: the CLS token and the mean of the patch tokens, concatenated ([B, 2d]), classified into
      6 colours, 4 shapes and 9 positions;
    * patch level: every patch token says whether it covers the object (``Scene.coverage`` > 0) and, if it
      does, the object's colour and shape. This puts the whole object's identity into the very tokens the
      language model reads (the projector sees patch tokens only; CLS is dropped), and a patch that holds
      only an edge of a star must learn "star" from its neighbours through the encoder's attention.
    """

    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(2 * width, len(COLOURS))
        self.shape = torch.nn.Linear(2 * width, len(SHAPES))
        self.position = torch.nn.Linear(2 * width, len(POSITIONS))
        self.patch = torch.nn.Linear(width, 1 + len(COLOURS) + len(SHAPES))

    def loss(self, hidden: torch.Tensor, scenes) -> tuple[torch.Tensor, float]:
        """Summed cross-entropy of the heads and the mean image-level accuracy over the three attributes."""
        hidden = hidden.float()
        pooled = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)
        colour = torch.tensor([list(COLOURS).index(s.colour) for s in scenes])
        shape = torch.tensor([SHAPES.index(s.shape) for s in scenes])
        truth = {"colour": colour, "shape": shape, "position": torch.tensor([s.row * 3 + s.col for s in scenes])}
        total, correct = 0.0, 0.0
        for name, target in truth.items():
            logits = getattr(self, name)(pooled)
            total = total + torch.nn.functional.cross_entropy(logits, target)
            correct += float((logits.argmax(-1) == target).float().mean()) / 3
        patch = self.patch(hidden[:, 1:])  # [B, P, 1 + colours + shapes]
        covered = torch.from_numpy(np.stack([s.coverage.reshape(-1) > 0 for s in scenes]))  # [B, P]
        total = total + torch.nn.functional.binary_cross_entropy_with_logits(patch[..., 0], covered.float())
        on = patch[covered]  # [n covered patches, ...]
        n_colours = len(COLOURS)
        rows = covered.nonzero()[:, 0]
        total = total + torch.nn.functional.cross_entropy(on[:, 1 : 1 + n_colours], colour[rows])
        total = total + torch.nn.functional.cross_entropy(on[:, 1 + n_colours :], shape[rows])
        return total, correct


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    out: str | Path,
    *,
    steps: int = DEFAULTS["steps"],
    seed: int = 0,
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    warmup: int = DEFAULTS["warmup"],
    weight_decay: float = DEFAULTS["weight_decay"],
    language_model: str | Path | None = None,
    eval_images: int = DEFAULTS["eval_images"],
    threads: int = 1,
    progress: bool | None = None,
    verbose: bool = False,
    pretrain_steps: int = DEFAULTS["pretrain_steps"],
    pretrain_batch: int = DEFAULTS["pretrain_batch"],
    aux_weight: float = DEFAULTS["aux_weight"],
) -> dict[str, Any]:
    """Train vision tower + projector, write weights, settings and log into ``out``; return the log.

    Args:
        out: output folder (created).
        steps: optimizer steps (each on ``batch_size`` fresh images). ``steps=3`` is a smoke run (~1 min).
        seed: seeds the vision/projector init (``torch``) and the training images (numpy streams).
        batch_size, lr, warmup, weight_decay: the optimisation recipe (AdamW; cosine to 0.1 × lr).
        language_model: saved LM folder; default ``default_language_model()`` (the embedded SmolLM2, dequantized, in lens's cache).
        eval_images: held-out images captioned at the end (``0`` skips the evaluation).
        threads: ``torch.set_num_threads``.
        progress: a tqdm bar; default only when stderr is a terminal.
        pretrain_steps, pretrain_batch: stage 1, the vision tower alone trained on colour/shape/position
            labels by linear heads (:class:`AttributeHeads`, discarded afterwards; no language model, seconds).
        aux_weight: weight of those heads' loss added to the caption loss in stage 2.
        verbose: print a plain line (step, loss, seconds) to stderr every 25 steps (for logs, non-interactive).

    Returns:
        the training log dict (also written as ``out/training_log.json``).

    Raises:
        ValueError: ``steps`` < 1 or ``batch_size`` < 1.
        FileNotFoundError: no language model found.

    Example:
        >>> log = train("/tmp/toyvlm", steps=3, eval_images=0)    # doctest: +SKIP
        >>> log["steps"]                                           # doctest: +SKIP
        3
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    import transformers

    from .build import default_language_model

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm_dir = Path(language_model) if language_model is not None else default_language_model()
    spec = default_spec()
    model, processor = assemble_model(lm_dir, None, spec=spec, seed=seed)
    model.requires_grad_(False)
    params = []
    for module in (model.model.vision_tower, model.model.multi_modal_projector):
        module.requires_grad_(True)
        module.train()
        params += list(module.parameters())
    eos = processor.tokenizer.eos_token
    prompt_ids = processor(images=make_scenes(1, seed)[0].image, text=prompt_text(spec=spec), return_tensors="pt")["input_ids"]
    _check_tokenization(processor, prompt_ids, eos, spec)

    heads = AttributeHeads(model.config.vision_config.hidden_size)
    params += list(heads.parameters())
    torch.manual_seed(seed)

    # stage 1: the vision tower alone learns colour / shape / position (cheap: no language model involved)
    t_pre, pre_curve = time.perf_counter(), []
    if pretrain_steps > 0:
        vision_params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
        pre_opt = torch.optim.AdamW(vision_params, lr=2e-3, betas=(0.9, 0.98), weight_decay=weight_decay)
        pre_sched = torch.optim.lr_scheduler.LambdaLR(pre_opt, lambda s: _lr_factor(s, pretrain_steps, 20))
        for step in range(pretrain_steps):
            scenes = make_scenes(pretrain_batch, seed, stream=PRETRAIN_STREAM_BASE + step)
            pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
            aux, acc = heads.loss(model.model.vision_tower(pixels).last_hidden_state, scenes)
            pre_opt.zero_grad(set_to_none=True)
            aux.backward()
            torch.nn.utils.clip_grad_norm_(vision_params, 1.0)
            pre_opt.step()
            pre_sched.step()
            pre_curve.append((float(aux.detach()), acc))
            if verbose and ((step + 1) % 50 == 0 or step + 1 == pretrain_steps):
                print(f"pretrain {step + 1}/{pretrain_steps} loss {aux.item():.4f} acc {acc:.3f}", file=sys.stderr, flush=True)
    pretrain_seconds = time.perf_counter() - t_pre

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="toyvlm train")
    losses: list[float] = []
    t_train, cpu_train = time.perf_counter(), time.process_time()
    for step in range(steps):
        scenes = make_scenes(batch_size, seed, stream=TRAIN_STREAM_BASE + step)
        ids, targets, pixels, plen = _batch(processor, prompt_ids, scenes, eos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, vision_hidden = caption_loss(model, ids, targets, pixels, plen, return_vision=True)
        aux, _ = heads.loss(vision_hidden, scenes)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if verbose and ((step + 1) % 25 == 0 or step + 1 == steps):
            recent = float(np.mean(losses[-25:]))
            print(f"step {step + 1}/{steps} loss {recent:.4f} {time.perf_counter() - t_train:.0f}s", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - cpu_train

    weights = trainable_state(model, torch.float16)
    _save_weights(weights, out / WEIGHTS_NAME, seed, steps)
    (out / SPEC_NAME).write_text(json.dumps(spec, indent=1) + "\n")

    held_out = None
    if eval_images > 0:
        load_trainable(model, weights)  # evaluate exactly what was written (fp16-rounded)
        model.eval()
        held_out = heldout_accuracy(model, processor, eval_images, EVAL_SEED)

    log = {
        "model": spec["name"],
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "images_seen": steps * batch_size,
        "optimizer": {"name": "AdamW", "lr": lr, "betas": [0.9, 0.98], "weight_decay": weight_decay,
                      "warmup_steps": warmup, "schedule": "linear warm-up, cosine to 0.1 x lr", "clip_grad_norm": 1.0},
        "pretrain": {"steps": pretrain_steps, "batch_size": pretrain_batch, "lr": 2e-3, "seconds": round(pretrain_seconds, 1),
                     "final_attribute_accuracy": round(float(np.mean([a for _, a in pre_curve[-10:]])), 4) if pre_curve else None},
        "aux_weight": aux_weight,
        "autocast": "bfloat16",
        "threads": threads,
        "loss_curve": _sample_curve(losses),
        "final_loss_mean_last_10": float(np.mean(losses[-10:])),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # all threads; ~ threads x wall time on an idle machine
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "seconds_per_step": round(train_seconds / steps, 3),
        "trainable_parameters": int(sum(v.numel() for v in weights.values())),
        "weights_dtype": "float16",
        "language_model": {
            "folder_name": lm_dir.name,
            "gguf_sha256": _gguf_sha256(lm_dir),
            "frozen": True,
        },
        "held_out": held_out,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
    }
    (out / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    return log


def _check_tokenization(processor, prompt_ids: torch.Tensor, eos: str, spec) -> None:
    """The manual prompt + caption concatenation must equal what the processor makes of the whole text."""
    scene = make_scenes(1, 0)[0]
    whole = processor(images=scene.image, text=prompt_text(spec=spec) + scene.caption + eos, return_tensors="pt")
    ids, targets, _, plen = _batch(processor, prompt_ids, [scene], eos)
    if not torch.equal(whole["input_ids"], ids):
        raise RuntimeError("prompt + caption tokenization differs from the processor's; check the chat template")


def _save_weights(weights: dict[str, torch.Tensor], path: Path, seed: int, steps: int) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(weights, str(tmp), metadata={"format": "pt", "model": "toy-shapes-vlm", "seed": str(seed), "steps": str(steps)})
    tmp.replace(path)


def _sample_curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """[[step, mean loss over the window ending at step], ...] at about ``points`` evenly spaced steps."""
    every = max(1, len(losses) // points)
    curve = []
    for end in range(every, len(losses) + 1, every):
        curve.append([end, round(float(np.mean(losses[end - every : end])), 4)])
    if not curve or curve[-1][0] != len(losses):
        curve.append([len(losses), round(float(np.mean(losses[-every:])), 4)])
    return curve


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m lens.models.toyvlm.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--language-model", type=Path, default=None, help="saved LM folder (default: SmolLM2 from GGUF)")
    p.add_argument("--eval-images", type=int, default=DEFAULTS["eval_images"], help="held-out images at the end (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared machine)")
    p.add_argument("--pretrain-steps", type=int, default=DEFAULTS["pretrain_steps"])
    p.add_argument("--aux-weight", type=float, default=DEFAULTS["aux_weight"],
                   help="weight of the attribute heads' loss during caption training")
    p.add_argument("--verbose", action="store_true", help="a plain progress line every 25 steps")
    args = p.parse_args(argv)
    log = train(
        args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps),
        language_model=args.language_model, eval_images=args.eval_images, threads=args.threads, verbose=args.verbose,
        pretrain_steps=args.pretrain_steps, aux_weight=args.aux_weight,
    )
    # the exact command, so that the log says how to repeat the run
    log["command"] = "python -m lens.models.toyvlm.train " + " ".join(sys.argv[1:] if argv is None else argv)
    (Path(args.out) / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    summary = {k: log[k] for k in ("steps", "seed", "train_seconds", "wall_seconds", "final_loss_mean_last_10")}
    if log["held_out"] is not None:
        summary["held_out_accuracy"] = log["held_out"]["accuracy"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
