"""Stage 1 — models: from a name, folder or object to a ``LensModel`` running its deployed kernels.

| module | what it holds |
|---|---|
| ``families`` | one declarative row per architecture: where blocks, attention, MLP and norms are; VLM rows |
| ``lensmodel`` | ``LensModel``: the Hugging Face model, tokenizer, shape and deployment |
| ``load`` | ``lens.load``: embedded model, hub id, folder, GGUF file, loaded model, TransformerLens bridge |
| ``bridge`` | the Hugging Face model behind a TransformerLens ``TransformerBridge`` (no copy) |
| ``inputs`` | what users pass to ``lens.trace`` → token sequences, with clear errors; ``prepend_bos`` |
| ``forms`` | a tokenizer's output in every form (lists, numpy, torch, dicts, encodings) → unpadded rows |
| ``labels`` | readable token labels that keep ids exact (byte-level BPE pieces decoded together) |
| ``multimodal`` | image + text inputs of a vision-language model → token sequences with their images |
| ``images`` | one image a user hands over (PIL, numpy, path) → RGB, with clear errors |
| ``processors`` | a VLM's processor, with an image-only fallback where transformers needs torchvision |
| ``vision`` | image-token layouts: (image, tile, row, col) per token, the vision tower's token order |
| ``attention`` | the lens attention function registered with ``transformers.AttentionInterface`` |
| ``observers`` | the context-local hand-off from the attention function to whoever observes it |
| ``deploy`` | sparse attention and low-bit weights applied to a loaded model |
| ``hub`` | whether the Hugging Face Hub is reachable, and the download command of the installed client |

Imports only ``lens.kernels`` and the shared modules (``lens.errors``, ``lens.run``, ``lens.atomic``).
Nothing here is imported by ``import lens`` until first used (``lens.load`` resolves lazily).
"""
