"""Readable token labels that keep ids exact, for byte-level tokenizers too.

Decoding each token alone is what every toolkit does, and it fails for byte-level BPE (GPT-2, Llama 3,
Qwen, …) and SentencePiece byte fallback: a character of several UTF-8 bytes is split over several
tokens, and each piece alone decodes to U+FFFD ('�') — "日本語" becomes nine '�'. :func:`token_labels`
decodes such pieces *together* with the tokenizer's own ``decode`` and gives each character to the token
where it begins; the other pieces of that character are **continuation** tokens with an empty label. So

* every label is text the tokenizer itself produces (no guessing of byte tables), ids are untouched;
* the labels of a sequence concatenate to ``tokenizer.decode(ids)`` wherever the pieces were split;
* a token that completes no character (invalid bytes, a character cut by truncation) keeps its '�'.

Hand-written because neither ``tokenizers`` nor ``transformers`` offers per-token text for split
characters (``offset_mapping`` gives every piece the whole character's span, and needs the text).
"""

from __future__ import annotations

__all__ = ["token_labels"]

_REPLACEMENT = "\ufffd"


def _label_run(decode, ids: list[int], start: int, stop: int, labels: list[str], continuation: list[bool]) -> None:
    """Labels for ids[start:stop], a run of tokens that do not decode alone."""
    window = start  # the decode window starts at the first token whose bytes are not all emitted
    emitted = ""  # text of the window already given to a token
    group = start  # first token since the last emission: the token where the next character begins
    for m in range(start, stop):
        text = decode(ids[window : m + 1])
        last = m == stop - 1
        stable = text if last else text.rstrip(_REPLACEMENT)
        new = stable[len(emitted):]
        if new:
            labels[group] = new
            for t in range(group + 1, m + 1):
                labels[t] = ""
                continuation[t] = True
            group = m + 1
            emitted = stable
        if text == stable:  # nothing pending: the next window starts fresh (keeps the work linear)
            window, emitted = m + 1, ""
    for t in range(group, stop):  # pieces after the last emission (only when the run ends mid-character)
        labels[t] = ""
        continuation[t] = True


def token_labels(tokenizer, ids: list[int]) -> tuple[list[str], list[bool]]:
    """(label per token, continuation flag per token) for one sequence of token ids.

    A token that decodes alone to clean text is labelled with that text (``tokenizer.decode([id])``, as
    before). Runs of tokens that do not (their decode contains '�') are decoded together and each character
    goes to the token where it begins; the other pieces get ``""`` and ``continuation=True`` (views show
    them as ``lens.run.CONTINUATION_MARK``, see ``Run.token_labels``).

    Example (a byte-level BPE tokenizer that splits every CJK character into three bytes)::

        token_labels(tok, tok("日本")["input_ids"])
        # (['日', '', '', '本', '', ''], [False, True, True, False, True, True])
    """
    cache: dict[int, str] = {}
    labels: list[str] = []
    for t in ids:
        if t not in cache:
            cache[t] = tokenizer.decode([t])
        labels.append(cache[t])
    continuation = [False] * len(ids)
    if not any(_REPLACEMENT in label for label in labels):
        return labels, continuation

    def decode(seq: list[int]) -> str:
        return tokenizer.decode(seq, skip_special_tokens=False)

    i = 0
    while i < len(ids):
        if _REPLACEMENT not in labels[i]:
            i += 1
            continue
        j = i
        while j < len(ids) and _REPLACEMENT in labels[j]:
            j += 1
        _label_run(decode, ids, i, j, labels, continuation)
        i = j
    return labels, continuation
