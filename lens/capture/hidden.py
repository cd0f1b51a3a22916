"""Hidden states of chosen residual layers, batch by batch, for consumers that stream over a corpus.

``lens.trace(..., keep_hidden=...)`` keeps X_ℓ for every token of a run beside all the residual statistics
(norms, massive activations, spectra of every layer). A text bank (``lens.TextBank.build``) needs only X_ℓ at a
few layers, for a corpus far larger than a run, and hands each batch to a reservoir before the next one: this
module is that lighter path. It reads X_ℓ where ``lens.trace`` reads it (docs/definitions.md, notation: the
input of block ℓ, and X_L the output of the last block, before the final norm), with the same forward hooks,
and stops the forward pass after the last layer asked for — blocks above it are never computed.

Example::

    lm = lens.load()
    for rows, states in iter_hidden_states(lm, [[101, 7592, 102], [101, 2088, 102]], layers=(2, 6)):
        states[6][0].shape            # (3, 384): X_6 of the first sequence's three tokens
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lens.errors import ConfigError, NumericalError
from lens.models.inputs import pad_batch

__all__ = ["iter_hidden_states"]


class _Enough(Exception):
    """Raised inside a hook once the highest requested layer is read: the rest of the forward is skipped."""


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


@torch.inference_mode()
def iter_hidden_states(
    lm, id_lists: Sequence[Sequence[int]], layers: Sequence[int], *, batch_size: int = 16
) -> Iterator[tuple[list[int], dict[int, list[torch.Tensor]]]]:
    """Run ``lm`` (a ``LensModel``) over token sequences and yield their residual stream at ``layers``.

    ``id_lists``: token-id sequences (already tokenized, special tokens included). ``layers``: residual layers
    in 0..L (0 = the embeddings entering block 0, L = the last block's output before the final norm).
    Batches keep the given order and are right-padded; padding never reaches the output.

    Yields ``(rows, states)`` per batch: ``rows`` the indices (into ``id_lists``) of the batch's sequences and
    ``states[ℓ][i]`` a float32 tensor ``[len(id_lists[rows[i]]), d_model]`` — X_ℓ of that sequence.

    Raises ``ConfigError`` for a layer outside 0..L or a batch size below 1, ``NumericalError`` when a
    requested hidden state is not finite.

    Example: ``next(iter_hidden_states(lm, [[1, 2, 3]], [0]))[1][0][0].shape`` → ``(3, d_model)``.
    """
    wanted = sorted({int(x) for x in layers})
    if not wanted:
        raise ConfigError("iter_hidden_states needs at least one layer")
    bad = [x for x in wanted if not 0 <= x <= lm.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; residual layers of {lm.model_id} are 0..{lm.n_layers}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1; got {batch_size}")
    top = wanted[-1]
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = hidden.detach().float()
        if layer == top and top < lm.n_layers:
            raise _Enough

    def pre_hook(layer: int):
        def hook(module, args, kwargs):
            keep(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def post_hook(module, args, output):
        keep(lm.n_layers, output[0] if isinstance(output, (tuple, list)) else output)

    handles = [lm.blocks[x].register_forward_pre_hook(pre_hook(x), with_kwargs=True) for x in wanted if x < lm.n_layers]
    if top == lm.n_layers:
        handles.append(lm.blocks[-1].register_forward_hook(post_hook))
    pad = _pad_id(lm.tokenizer)
    device = lm.device
    kwargs = {"use_cache": False} if lm.causal else {}
    was_training = lm.model.training
    lm.model.eval()
    try:
        for start in range(0, len(id_lists), batch_size):
            rows = list(range(start, min(start + batch_size, len(id_lists))))
            input_ids, mask = pad_batch([list(id_lists[i]) for i in rows], pad)
            captured.clear()
            try:
                lm.base(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
            except _Enough:
                pass
            states: dict[int, list[torch.Tensor]] = {}
            for layer in wanted:
                hidden = captured[layer]
                seqs = [hidden[i, : len(id_lists[r])].cpu() for i, r in enumerate(rows)]
                for r, x in zip(rows, seqs):
                    if not torch.isfinite(x).all():
                        raise NumericalError(
                            f"the residual stream at layer {layer} is not finite for sequence {r}; load the model "
                            "with dtype='float32' and check its weights with torch.isfinite"
                        )
                states[layer] = seqs
            yield rows, states
    finally:
        for handle in handles:
            handle.remove()
        lm.model.train(was_training)
