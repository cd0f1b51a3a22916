"""The bad-input corpus: everything a user can get wrong, against the API and the CLI, counted.

Every case must end in one of two ways:

* a **clear error** — a ``LensError`` subclass whose message says what to do (for the CLI: a non-zero exit
  status, the message on stderr, no traceback), or
* a **correct result** — checked, not just "no exception" (finite statistics, the right lengths, labels
  that decode back to the text, an exit status of 0 with the expected output);

anything else (a raw ``TypeError``, an unhelpful message, a wrong result, a stray temporary file) is counted
as "anything else", and the goal is 0. Each case runs in a fresh folder, which must afterwards hold only
the files the case was meant to write: nothing half-written is left on disk.

The counts are printed (``pytest -s tests/test_bad_inputs.py``) and written to ``$LENS_BAD_INPUTS_REPORT``
when that variable names a file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import build_tiny

import lens
from lens.errors import LensError

# a message "says what to do" when it gives an instruction
_ADVICE = re.compile(
    r"\b(pass|use|give|remove|load|trace|save|check|decode|repair|choose|split|tokenize|re-create|leave|add|convert|"
    r"install|point|read|describe|register|delete|keep|call|download|fix|tokenize|pad|drop|set)\b"
    r"|must be|valid \w+:|one of|e\.g\.",
    re.IGNORECASE,
)
COUNTS = {"clear error": 0, "correct result": 0, "anything else": 0}
PROBLEMS: list[str] = []


@dataclass
class Case:
    name: str
    run: Callable[[Path], Any]  # gets a fresh folder (also the working directory)
    check: Callable[[Any], bool] | None = None  # a correct result must pass it; None: an error is expected
    writes: tuple[str, ...] = ()  # files the case may leave when it succeeds
    advice: bool = True  # an API error must say what to do; the CLI's usage errors say what is wrong


def _classify(case: Case, folder: Path) -> str:
    before = set(os.listdir(folder))
    try:
        result = case.run(folder)
    except LensError as exc:
        message = str(exc)
        clear = len(message) >= 30 and (not case.advice or _ADVICE.search(message))
        outcome = "clear error" if clear else f"unclear LensError: {message!r}"
        allowed: tuple[str, ...] = ()
    except Exception as exc:  # noqa: BLE001 - the point is to catch what should not happen
        outcome = f"{type(exc).__name__}: {exc}"
        allowed = ()
    else:
        ok = False
        if case.check is not None:
            try:
                ok = bool(case.check(result))
            except Exception:  # noqa: BLE001 - a check that cannot run is not a correct result
                ok = False
        outcome = "correct result" if ok else f"wrong or unchecked result: {result!r:.200}"
        allowed = case.writes
    left = set(os.listdir(folder)) - before - set(allowed)
    if left:
        outcome = f"left files behind: {sorted(left)} ({outcome})"
    return outcome


def _tally(cases: list[Case], tmp_path: Path) -> list[str]:
    problems = []
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i:03d}"
        folder.mkdir()
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            outcome = _classify(case, folder)
        finally:
            os.chdir(cwd)
        key = outcome if outcome in COUNTS else "anything else"
        COUNTS[key] += 1
        if key == "anything else":
            problems.append(f"{case.name}: {outcome}")
    PROBLEMS.extend(problems)
    return problems


def _finite_run(run) -> bool:
    floats = [v for k, v in run.arrays.items() if v.dtype.kind == "f" and not k.startswith("mlp.top")]
    return isinstance(run, lens.Run) and all(np.isfinite(v).all() for v in floats)


def _labels_decode(lm):
    def check(run) -> bool:
        for s in range(run.n_sequences):
            ids = run.arrays["token_ids"][run.span(s)].tolist()
            pieces = "".join(run.tokens[s])
            if "\ufffd" not in lm.tokenizer.decode(ids) and "\ufffd" in pieces:
                return False
        return _finite_run(run)

    return check


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def models(tiny_model_dir, minilm):
    return {"gpt2": lens.load(tiny_model_dir("gpt2")), "llama": lens.load(tiny_model_dir("llama")), "minilm": minilm}


def _trace(lm, inputs, **kwargs):
    return lambda folder: lens.trace(lm, inputs, progress=False, **kwargs)


def _text_cases(name: str, lm) -> list[Case]:
    limit = lm.max_positions
    huge = "word " * 200_000
    ok = _labels_decode(lm)
    cases = [
        ("empty string", "", None, {}),
        ("whitespace only", "   \n\t ", None, {}),
        ("unicode spaces only", "\u3000\u2003\u00a0", None, {}),
        ("empty list", [], None, {}),
        ("one empty item", ["fine", ""], None, {}),
        ("huge text", huge, None, {}),
        ("huge text, truncate=True", huge, lambda r: r.lengths.tolist() == [limit] and r.meta["truncated"] == [True], {"truncate": True}),
        ("one endless word", "a" * 100_000, lambda r: "[UNK]" in r.tokens[0] and _finite_run(r), {}),
        ("control characters", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f", ok, {}),
        ("zero-width and BOM", "\u200b\u200d\ufeffword", ok, {}),
        ("RTL override and Arabic", "\u202eabc \u0627\u0644\u0639\u0631\u0628\u064a\u0629", ok, {}),
        ("emoji ZWJ and flags", "👩‍👩‍👧 🇫🇷 ❤️", ok, {}),
        ("combining marks", "e\u0301\u0301\u0301\u0308", ok, {}),
        ("only special-token strings", "<|endoftext|><s></s>[CLS]", ok, {}),
        ("lone high surrogate", "ok \ud800 ok", None, {}),
        ("lone low surrogate in a list", ["fine", "x\udc80y"], None, {}),
        ("surrogate in a sentence pair", [("fine", "bad \udfff")], None, {}),
        ("bytes", b"hello", None, {}),
        ("bytes in a list", ["fine", b"hello"], None, {}),
        ("None", None, None, {}),
        ("None in a list", ["fine", None], None, {}),
        ("an int", 42, None, {}),
        ("a float in a list", ["fine", 3.5], None, {}),
        ("a set", {"a", "b"}, None, {}),
        ("a generator", (t for t in ["a"]), None, {}),
        ("a triple of strings", [("a", "b", "c")], None, {}),
        ("a dict without input_ids", {"text": "hi"}, None, {}),
        ("numpy array of strings", np.array(["first text", "second"]), ok, {}),
        ("many short texts", ["a b"] * 40, lambda r: r.n_sequences == 40 and _finite_run(r), {}),
        ("pairs", [("The cat sat.", "It was on the mat.")], ok, {}),
    ]
    return [Case(f"{name}: {title}", _trace(lm, value, **kw), check) for title, value, check, kw in cases]


def _id_cases(name: str, lm) -> list[Case]:
    vocab = lm.model.get_input_embeddings().num_embeddings
    good = lm.tokenizer("A normal sentence.")["input_ids"]
    same = lambda r: r.arrays["token_ids"].tolist() == good and _finite_run(r)  # noqa: E731
    cases = [
        ("empty 1-D tensor", torch.tensor([], dtype=torch.long), None),
        ("empty batch", torch.zeros(0, 5, dtype=torch.long), None),
        ("0-d tensor", torch.tensor(5), None),
        ("float tensor", torch.tensor([[1.0, 2.0]]), None),
        ("bool tensor", torch.tensor([[True, False]]), None),
        ("complex tensor", torch.tensor([[1 + 2j]]), None),
        ("3-D tensor", torch.ones(1, 2, 3, dtype=torch.long), None),
        ("float numpy", np.array([[1.0, 2.0]]), None),
        ("negative id", [[1, -5, 2]], None),
        ("id past the vocabulary", [[1, vocab, 2]], None),
        ("huge id", torch.tensor([[2**40]]), None),
        ("uint8 ids", torch.tensor([good], dtype=torch.uint8) if max(good) < 256 else torch.tensor([good]), same),
        ("ragged int lists", [good, good[:3]], lambda r: r.lengths.tolist() == [len(good), 3]),
        ("a string among ids", [[1, "2"]], None),
        ("bools as ids", [True, False], None),
        ("mask shorter than ids", {"input_ids": [good], "attention_mask": [[1] * (len(good) - 1)]}, None),
        ("mask with a hole", {"input_ids": [good], "attention_mask": [[1, 0] + [1] * (len(good) - 2)]}, None),
        ("mask of 2s", {"input_ids": [good], "attention_mask": [[2] * len(good)]}, None),
        ("float mask of 0.5", {"input_ids": torch.tensor([good]), "attention_mask": torch.full((1, len(good)), 0.5)}, None),
        ("float mask of 0/1", {"input_ids": torch.tensor([good]), "attention_mask": torch.ones(1, len(good))}, same),
        ("all-zero mask", {"input_ids": [good], "attention_mask": [[0] * len(good)]}, None),
        ("mask rows ≠ id rows", {"input_ids": [good, good], "attention_mask": [[1] * len(good)]}, None),
        ("inputs_embeds only", {"inputs_embeds": torch.zeros(1, 3, lm.d_model)}, None),
        ("pixel_values", {"input_ids": [good], "attention_mask": [[1] * len(good)],
                          "pixel_values": torch.zeros(1, 3, 8, 8)}, None),
        ("an unknown field", {"input_ids": [good], "mystery": [[1] * len(good)]}, None),
        ("position ids out of range", {"input_ids": [good], "position_ids": [[10**6] * len(good)]}, None),
        ("encodings with different fields", [{"input_ids": good}, {"input_ids": good, "attention_mask": [1] * len(good)}],
         None),
        ("a list mixing encodings and text", [{"input_ids": good}, "text"], None),
    ]
    return [Case(f"{name}: {title}", _trace(lm, value), check) for title, value, check in cases]


def _option_cases(lm) -> list[Case]:
    text = "A normal sentence."
    options = [
        ("batch_size=0", {"batch_size": 0}), ("batch_size='8'", {"batch_size": "8"}),
        ("batch_size=True", {"batch_size": True}), ("capture=None", {"capture": None}),
        ("capture=['bogus']", {"capture": ["bogus"]}), ("capture=[]", {"capture": []}),
        ("keep_patterns='bogus'", {"keep_patterns": "bogus"}), ("keep_patterns=[(99, 0)]", {"keep_patterns": [(99, 0)]}),
        ("keep_patterns={0: 'x'}", {"keep_patterns": {0: "x"}}), ("keep_hidden=[99]", {"keep_hidden": [99]}),
        ("keep_hidden='x'", {"keep_hidden": "x"}), ("track_neurons=[(0,)]", {"track_neurons": [(0,)]}),
        ("track_neurons=[(0, 10**6)]", {"track_neurons": [(0, 10**6)]}), ("top_k_massive=0", {"top_k_massive": 0}),
        ("truncate='no'", {"truncate": "no"}), ("prepend_bos='yes'", {"prepend_bos": "yes"}),
        ("capture=('logits',) on an encoder", {"capture": ("logits",)}),
    ]
    cases = [Case(f"option {title}", _trace(lm, text, **kw)) for title, kw in options]
    cases.append(Case("option capture='attention' (a string)", _trace(lm, text, capture="attention"),
                      lambda r: r.has("attn.key_mass") and not r.has("resid.norm")))
    return cases


def _load_cases(tmp_root: Path, tiny_model_dir) -> list[Case]:
    gpt2 = tiny_model_dir("gpt2")

    def broken_copy(name, edit):
        folder = tmp_root / name
        shutil.copytree(gpt2, folder)
        edit(folder)
        return folder

    no_weights = broken_copy("no-weights", lambda f: [p.unlink() for p in f.glob("*.safetensors")])
    bad_config = broken_copy("bad-config", lambda f: (f / "config.json").write_text("{ not json"))
    no_tokenizer = broken_copy("no-tokenizer", lambda f: [p.unlink() for p in f.glob("tokenizer*")])
    remote = tmp_root / "remote-code"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    (remote / "configuration_my.py").write_text(f"open({str(remote / 'EXECUTED')!r}, 'w').write('ran')\n")
    t5 = tmp_root / "t5"
    import transformers

    transformers.T5Model(transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)) \
        .save_pretrained(t5)
    text_file = tmp_root / "notes.txt"
    text_file.write_text("not a model")

    def remote_refused(folder):
        return lens.load(remote)  # the test below asserts that nothing of the folder's code ran
    return [
        Case("load: empty name", lambda f: lens.load("")),
        Case("load: unknown hub id offline", lambda f: lens.load("no-such-org/no-such-model-xyz")),
        Case("load: folder without weights", lambda f: lens.load(no_weights)),
        Case("load: corrupt config.json", lambda f: lens.load(bad_config)),
        Case("load: folder without tokenizer", lambda f: lens.load(no_tokenizer)),
        Case("load: trust_remote_code model (refused by default)", remote_refused),
        Case("load: unsupported architecture", lambda f: lens.load(t5)),
        Case("load: a text file", lambda f: lens.load(text_file)),
        Case("load: an int", lambda f: lens.load(42)),
        Case("load: dtype='float8'", lambda f: lens.load(gpt2, dtype="float8")),
        Case("load: attention='bogus'", lambda f: lens.load(gpt2, attention="bogus")),
        Case("load: quant='int3'", lambda f: lens.load(gpt2, quant="int3")),
        Case("load: a model object without a tokenizer",
             lambda f: lens.load(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))),
    ]


def _weight_cases(tmp_root: Path) -> list[Case]:
    def poisoned(name, value, where):
        def init(model):
            if where == "mlp":
                model.transformer.h[1].mlp.c_fc.weight[0, 0] = value
            else:
                model.transformer.wte.weight[:] = value

        return lens.load(build_tiny("gpt2", tmp_root / name, init=init))

    return [
        Case("weights: NaN in an MLP", lambda f: lens.trace(poisoned("nan-mlp", float("nan"), "mlp"), "Hello", progress=False)),
        Case("weights: inf in an MLP", lambda f: lens.trace(poisoned("inf-mlp", float("inf"), "mlp"), "Hello", progress=False)),
        Case("weights: NaN embeddings", lambda f: lens.trace(poisoned("nan-emb", float("nan"), "emb"), "Hello", progress=False)),
    ]


def _file_cases(run, tmp_root: Path) -> list[Case]:
    good = run.save(tmp_root / "good.lens")
    raw = good.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    begin, end = header["attn.key_mass"]["data_offsets"]

    def variant(name, data: bytes) -> Path:
        path = tmp_root / name
        path.write_bytes(data)
        return path

    flipped = bytearray(raw)
    flipped[8 + header_len + begin + 5] ^= 0x04
    huge_header = (2**62).to_bytes(8, "little") + raw[8:]
    zip_path = tmp_root / "archive.lens"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("a.txt", "hello")
    np.save(tmp_root / "array.npy", np.arange(5))
    from safetensors.numpy import save_file

    save_file({"x": np.arange(3)}, tmp_root / "foreign.safetensors")
    meta_old = {"schema": "lens.run/999", "tokens": run.tokens, "meta": {}}
    save_file({"offsets": np.array([0, 1])}, tmp_root / "schema.lens", metadata={"lens": json.dumps(meta_old)})
    save_file({"offsets": np.array([0, 1])}, tmp_root / "badjson.lens", metadata={"lens": "{not json"})
    save_file({"offsets": np.array([0, 3, 1]), "token_ids": np.arange(1)}, tmp_root / "offsets.lens",
              metadata={"lens": json.dumps({"schema": "lens.run/1", "tokens": [["a", "b", "c"], []],
                                            "meta": {"n_layers": 1, "n_heads": 1, "causal": True}})})
    save_file({"offsets": np.array([0, 1]), "token_ids": np.arange(1)}, tmp_root / "nometa.lens",
              metadata={"lens": json.dumps({"schema": "lens.run/1", "tokens": [["a"]], "meta": {}})})
    files = {
        "missing file": tmp_root / "missing.lens",
        "a folder": tmp_root,
        "empty file": variant("empty.lens", b""),
        "truncated file": variant("truncated.lens", raw[: len(raw) // 2]),
        "random bytes": variant("random.lens", np.random.default_rng(0).bytes(4096)),
        "a pickle": variant("pickle.lens", pickle.dumps({"not": "a run"})),
        "a JSON file": variant("json.lens", b'{"schema": "lens.run/1"}'),
        "a GGUF header": variant("model.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 64),
        "a zip archive": zip_path,
        "a .npy array": tmp_root / "array.npy",
        "a foreign safetensors file": tmp_root / "foreign.safetensors",
        "one flipped bit in the data": variant("flipped.lens", bytes(flipped)),
        "a flipped header byte": variant("header.lens", raw[:12] + bytes([raw[12] ^ 0xFF]) + raw[13:]),
        "a header length of 2**62": variant("hugeheader.lens", huge_header),
        "an unknown schema": tmp_root / "schema.lens",
        "an unreadable lens header": tmp_root / "badjson.lens",
        "decreasing offsets": tmp_root / "offsets.lens",
        "meta without model shape": tmp_root / "nometa.lens",
    }
    cases = [Case(f"Run.load: {title}", (lambda p: lambda f: lens.Run.load(p))(path)) for title, path in files.items()]
    cases += [
        Case("Run.load: a good file", lambda f: lens.Run.load(good), lambda r: r.tokens == run.tokens),
        Case("Run.save: to a folder", lambda f: run.save(f)),
        Case("Run.save: below a file", lambda f: run.save(good / "x.lens")),
        Case("Run.save: to /proc", lambda f: run.save("/proc/self/x.lens")),
        Case("Run.save: a good path", lambda f: run.save(f / "out.lens"), lambda p: lens.Run.load(p).tokens == run.tokens,
             writes=("out.lens",)),
    ]
    return cases


def _cli(*args: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lens", *args], capture_output=True, text=True, env=env, timeout=600)


@dataclass
class CLIResult:
    code: int
    out: str
    err: str


class CLIError(LensError):
    """Stands for a CLI run that ended the right way for a bad input (non-zero, clear stderr, no traceback)."""


def _cli_case(name: str, args: list[str], expect_ok: Callable[[CLIResult], bool] | None = None) -> Case:
    def run(folder):
        done = _cli(*args)
        result = CLIResult(done.returncode, done.stdout, done.stderr)
        if "Traceback" in done.stderr:
            raise RuntimeError(f"traceback from the CLI: {done.stderr[-400:]}")
        if expect_ok is None:
            if done.returncode != 0 and done.stderr.strip():
                raise CLIError(f"exit {done.returncode}, stderr tells the user what to do: {done.stderr.strip()[-300:]}")
            raise RuntimeError(f"exit {done.returncode} without a message: {done.stdout[-200:]}")
        return result

    return Case(f"CLI: {name}", run, expect_ok, advice=False)


def _cli_cases(tmp_root: Path, run) -> list[Case]:
    good = run.save(tmp_root / "cli-good.lens")
    bad = tmp_root / "cli-bad.lens"
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x01
    bad.write_bytes(bytes(raw))
    return [
        _cli_case("verify a missing file", ["verify", str(tmp_root / "nope.lens")]),
        _cli_case("verify a corrupt file", ["verify", str(bad)]),
        _cli_case("verify a folder", ["verify", str(tmp_root)]),
        _cli_case("verify with no path", ["verify"]),
        _cli_case("an unknown command", ["frobnicate"]),
        _cli_case("an unknown benchmark", ["bench", "nosuch"]),
        _cli_case("bench with a bad option", ["bench", "capture", "--lengths", "abc"]),
        _cli_case("demo --out into /proc", ["demo", "--out", "/proc/x/report.html"]),
        _cli_case("demo --out a folder", ["demo", "--out", str(tmp_root)]),
        _cli_case("verify a good file", ["verify", str(good)], lambda r: r.code == 0 and "checksums ok" in r.out),
    ]


def _report():
    total = sum(COUNTS.values())
    line = (f"bad-input corpus: {total} cases — {COUNTS['clear error']} clear errors, "
            f"{COUNTS['correct result']} correct results, {COUNTS['anything else']} anything else")
    print("\n" + line)
    if os.environ.get("LENS_BAD_INPUTS_REPORT"):
        Path(os.environ["LENS_BAD_INPUTS_REPORT"]).write_text(json.dumps({**COUNTS, "problems": PROBLEMS}, indent=2))
    return line


# --------------------------------------------------------------------------------------------- tests


def test_api_inputs(models, tmp_path):
    cases = []
    for name, lm in models.items():
        cases += _text_cases(name, lm) + _id_cases(name, lm)
    cases += _option_cases(models["minilm"])
    problems = _tally(cases, tmp_path)
    assert not problems, "\n".join(problems)


def test_models_weights_and_files(models, tmp_path, tiny_model_dir):
    root = tmp_path / "inputs"
    root.mkdir()
    run = lens.trace(models["gpt2"], ["Emoji 😀 text", "Plain."], keep_patterns=[(0, 1)], progress=False)
    cases = _load_cases(root, tiny_model_dir) + _weight_cases(root) + _file_cases(run, root)
    problems = _tally(cases, tmp_path)
    assert not (root / "remote-code" / "EXECUTED").exists(), "lens ran a model's own code without being asked"
    assert not problems, "\n".join(problems)


def test_cli(models, tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    run = lens.trace(models["gpt2"], ["Plain."], progress=False)
    problems = _tally(_cli_cases(root, run), tmp_path)
    line = _report()
    assert not problems, "\n".join(problems)
    assert COUNTS["anything else"] == 0, line
