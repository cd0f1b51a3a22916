"""Interventions in a corpus scan equal the same interventions in lens.trace, document by document, and
change exactly the statistics downstream of the edit (docs/definitions.md, "Interventions", "Corpus scans")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scan_support import SCAN_CORPUS

import lens
from lens.errors import ConfigError, ScanError
from lens.scan.worker import ShardWorker

DOCS = SCAN_CORPUS[:8]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    torch.set_num_threads(1)
    return lens.load(tiny_model_dir("llama"))


def _scan(lm, folder, interventions=(), **options):
    options = {"top_k": 3, "samples": 1, "batch_size": 2, "max_len": 64, "logit_effects": 2, **options}
    return lens.scan(lm, DOCS, out=folder, interventions=interventions, progress=False, **options)


def _traced_neuron_max(lm, scan_result, interventions):
    """Per layer and neuron, the max activation over every document traced alone with lens.trace."""
    worker = ShardWorker(lm, scan_result_config(scan_result))
    best = None
    for ids in worker.tokenize(DOCS):
        run = lens.trace(lm, [ids], capture=("mlp",), prepend_bos=None, interventions=interventions,
                         progress=False)
        best = run.arrays["mlp.max"] if best is None else np.maximum(best, run.arrays["mlp.max"])
    return best


def scan_result_config(scan_result):
    from lens.scan.config import ScanConfig

    cfg = dict(scan_result.manifest["config"])
    for key in ("layers", "context", "moe_layers", "interventions"):
        cfg[key] = tuple(cfg.get(key, ()))
    return ScanConfig(**cfg)


@pytest.mark.parametrize("edit", [
    lens.Ablate("mlp", layer=0),                                   # every position: windows may be cut
    lens.Clamp(layer=1, dims=[3, 7], value=4.0, positions=[0]),    # a position of each whole document
    lens.Ablate("head", layer=0, head=1, positions=[-1]),          # the last token of each document
], ids=["ablate-mlp", "clamp-first", "ablate-head-last"])
def test_a_scan_with_an_intervention_equals_lens_trace_document_by_document(tiny_llama, tmp_path, edit):
    clean = _scan(tiny_llama, tmp_path / "clean")
    edited = _scan(tiny_llama, tmp_path / "edited", interventions=[edit])
    expected = _traced_neuron_max(tiny_llama, edited, [edit])
    np.testing.assert_allclose(edited.arrays["neuron.max"], expected, rtol=1e-5, atol=1e-6)
    # the edit acts downstream of where it is made, and nowhere upstream
    first_changed = {"ablate-mlp": 1, "clamp-first": 1, "ablate-head-last": 0}[_id(edit)]
    same = np.isclose(clean.arrays["neuron.max"], edited.arrays["neuron.max"], rtol=1e-6, atol=1e-7)
    assert same[:first_changed].all()
    assert not same[first_changed:].all()
    # provenance: the manifest says what was done
    manifest = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    assert manifest["config"]["interventions"] == [edit.describe()]


def _id(edit):
    if isinstance(edit, lens.Clamp):
        return "clamp-first"
    return "ablate-mlp" if edit.site == "mlp" else "ablate-head-last"


def test_positions_need_whole_documents_and_patch_is_refused(tiny_llama, tmp_path):
    # a document longer than max_len is cut into windows: positions would not be document positions
    with pytest.raises(ScanError, match="max_len"):
        _scan(tiny_llama, tmp_path / "cut", interventions=[lens.Clamp(layer=1, dims=[0], positions=[0])],
              max_len=8, stride=6)
    # without positions, windows are fine
    s = _scan(tiny_llama, tmp_path / "cut-ok", interventions=[lens.Ablate("mlp", layer=0)], max_len=8, stride=6)
    assert s.windows > len(DOCS)
    run = lens.trace(tiny_llama, DOCS[:1], progress=False)
    with pytest.raises(ConfigError, match="Patch"):
        _scan(tiny_llama, tmp_path / "patch", interventions=[lens.Patch(run, layer=1)])
    with pytest.raises(ConfigError, match="layer"):
        _scan(tiny_llama, tmp_path / "bad-layer", interventions=[lens.Ablate("mlp", layer=99)])
    with pytest.raises(ConfigError, match="Ablate, lens.Clamp"):
        _scan(tiny_llama, tmp_path / "not-one", interventions=["zero layer 3"])


def test_resuming_with_other_interventions_is_refused(tiny_llama, tmp_path):
    _scan(tiny_llama, tmp_path / "s", interventions=[lens.Ablate("mlp", layer=0)])
    with pytest.raises(ScanError):
        _scan(tiny_llama, tmp_path / "s", interventions=[lens.Ablate("mlp", layer=1)], resume=True)
