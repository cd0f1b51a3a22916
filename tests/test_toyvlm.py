"""toy-shapes-vlm: the generated images, the training script, the committed weights as a real LLaVA folder,
and the held-out caption accuracy — all offline, on the real SmolLM2 decoder (no mocks)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lens.models.toyvlm import data as D

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_by_seed():
    a, b = D.make_scenes(12, seed=5), D.make_scenes(12, seed=5)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert (x.caption, x.bbox, x.cells, x.rgb) == (y.caption, y.bbox, y.cells, y.rgb)
    # scene i does not depend on how many scenes are drawn
    assert [s.caption for s in D.make_scenes(4, seed=5)] == [s.caption for s in a[:4]]
    other = D.make_scenes(12, seed=6)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, other))
    held_out = D.make_scenes(12, seed=5, stream=1)
    assert all(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, held_out))


def _check_scene_against_pixels(s: D.Scene) -> None:
    px = np.asarray(s.image)
    assert px.shape == (D.IMAGE_SIZE, D.IMAGE_SIZE, 3) and px.dtype == np.uint8
    object_pixels = (px != np.asarray(s.background, dtype=np.uint8)).any(-1)
    assert np.array_equal(object_pixels, s.mask)
    assert (px[s.mask] == np.asarray(s.rgb, dtype=np.uint8)).all()
    assert (px[~s.mask] == np.asarray(s.background, dtype=np.uint8)).all()
    ys, xs = np.nonzero(object_pixels)
    assert s.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # the object lies inside its cell of the 3 x 3 layout
    x0, y0, x1, y1 = s.bbox
    assert s.col * D.CELL <= x0 and x1 <= (s.col + 1) * D.CELL
    assert s.row * D.CELL <= y0 and y1 <= (s.row + 1) * D.CELL
    # coverage / cells / token indices recomputed patch by patch from the pixels
    for r, c in itertools.product(range(D.GRID), range(D.GRID)):
        patch = object_pixels[r * D.PATCH_SIZE : (r + 1) * D.PATCH_SIZE, c * D.PATCH_SIZE : (c + 1) * D.PATCH_SIZE]
        assert s.coverage[r, c] == pytest.approx(patch.mean())
        assert ((r, c) in s.cells) == bool(patch.any())
    assert s.token_indices == tuple(r * D.GRID + c for r, c in s.cells)
    assert [D.token_cell(k) for k in s.token_indices] == list(s.cells)
    assert 1 <= len(s.cells) <= 4 and set(s.cells) <= {(2 * s.row + i, 2 * s.col + j) for i in (0, 1) for j in (0, 1)}
    assert D.parse_caption(s.caption) == {"colour": s.colour, "shape": s.shape, "position": s.position}


def test_boxes_and_patch_cells_match_the_pixels_for_every_combination():
    rng = np.random.default_rng(0)
    for colour, shape, pos in itertools.product(D.COLOURS, D.SHAPES, D.POSITIONS):
        s = D.make_scene(rng, colour=colour, shape=shape, position=pos)
        assert (s.colour, s.shape, (s.row, s.col)) == (colour, shape, pos)
        _check_scene_against_pixels(s)
    for s in D.make_scenes(100, seed=11):
        _check_scene_against_pixels(s)


def test_generator_rejects_unknown_attributes_and_parses_free_text():
    with pytest.raises(ValueError, match="colour"):
        D.make_scene(0, colour="teal")
    with pytest.raises(ValueError, match="shape"):
        D.make_scene(0, shape="hexagon")
    with pytest.raises(ValueError, match="position"):
        D.make_scene(0, position="upstairs")
    with pytest.raises(IndexError):
        D.token_cell(D.GRID * D.GRID)
    assert D.parse_caption("Nothing here") == {"colour": None, "shape": None, "position": None}
    assert D.parse_caption("An ORANGE star, at the center!")["position"] == "center"
    assert D.parse_caption("a blue circle at the top center.")["position"] == "top center"
    s = D.make_scene(3, colour="orange", shape="star")
    assert s.caption.startswith("an orange star at the ") and {"orange", "star", "stars"} <= s.words()


# ---------------------------------------------------------------- model (real SmolLM2 decoder)


@pytest.fixture(scope="session")
def lm_dir():
    """SmolLM2's dequantized folder in lens's cache; the test *fails* (not skips) when SmolLM2 is not fetched."""
    from conftest import require_smollm2_file

    from lens.models.toyvlm.build import default_language_model

    require_smollm2_file()
    return default_language_model(fetch=False)


@pytest.fixture(scope="session")
def vlm_folder(lm_dir, tmp_path_factory):
    from lens.models.toyvlm.build import build_folder

    return build_folder(lm_dir, tmp_path_factory.mktemp("toyvlm") / "folder")


@pytest.fixture(scope="session")
def vlm(vlm_folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(vlm_folder).eval()
    return model, AutoProcessor.from_pretrained(vlm_folder)


def test_language_model_folder_is_a_plain_saved_llama(lm_dir):
    config = json.loads((lm_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (lm_dir / "tokenizer.json").is_file() and (lm_dir / "model.safetensors").is_file()


@pytest.mark.slow  # ~45 s: three steps through the frozen SmolLM2 in a subprocess
def test_training_script_runs_three_steps_and_writes_weights_and_log(lm_dir, tmp_path):
    from safetensors import safe_open

    from lens.models.toyvlm.build import committed_weights

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lens.models.toyvlm.train", "--out", str(out), "--steps", "3", "--pretrain-steps", "3", "--seed", "1",
           "--eval-images", "4", "--language-model", str(lm_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and log["seed"] == 1 and len(log["loss_curve"]) == 3
    assert all(np.isfinite(loss) and loss > 0 for _, loss in log["loss_curve"])
    assert log["versions"]["torch"] and log["versions"]["transformers"] and log["wall_seconds"] > 0
    assert log["held_out"]["n"] == 4 and set(log["held_out"]["accuracy"]) == {"colour", "shape", "position"}
    assert json.loads((out / "toyvlm.json").read_text()) == json.loads((committed_weights().parent / "toyvlm.json").read_text())
    with safe_open(out / "weights.safetensors", "pt") as new, safe_open(committed_weights(), "pt") as old:
        assert set(new.keys()) == set(old.keys())
        for key in new.keys():
            assert new.get_slice(key).get_shape() == old.get_slice(key).get_shape()
            assert new.get_slice(key).get_dtype() == "F16"


def test_committed_weights_load_as_a_real_llava_through_from_pretrained(vlm, vlm_folder):
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from lens.models.toyvlm.build import committed_weights
    from lens.models.toyvlm.spec import prompt_text

    model, processor = vlm
    assert type(model) is LlavaForConditionalGeneration and type(processor) is LlavaProcessor
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in vlm_folder.iterdir()}
    state = model.state_dict()
    committed = load_file(committed_weights())
    assert len(committed) > 10
    for key, value in committed.items():
        assert torch.equal(state[key], value.float()), key
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    scene = D.make_scene(42, colour="blue", shape="triangle", position="bottom right")
    inputs = processor(images=scene.image, text=prompt_text(), return_tensors="pt")
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert len(image_positions) == D.GRID * D.GRID == model.config.image_seq_length
    assert (image_positions.diff() == 1).all()  # one contiguous row-major block
    assert inputs["pixel_values"].shape == (1, 3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert D.parse_caption(text) == {"colour": "blue", "shape": "triangle", "position": "bottom right"}, text


@pytest.fixture(scope="session")
def toy_lm(lm_dir):
    import lens

    return lens.load("toy-shapes-vlm")


@pytest.fixture(scope="session")
def held_out(toy_lm):
    """Greedy captions of the 96 held-out images (the training log's evaluation set), scored per attribute."""
    from lens.models.toyvlm.evaluate import heldout_accuracy

    return heldout_accuracy(toy_lm.model, toy_lm.processor, n=96)


def test_lens_load_by_name_gives_a_real_llava_whose_image_tokens_sit_on_the_scene(toy_lm):
    import lens
    from transformers import LlavaForConditionalGeneration

    assert type(toy_lm.model) is LlavaForConditionalGeneration and toy_lm.is_vlm
    assert toy_lm.model_id == "toy-shapes-vlm" and toy_lm.vision_family.name == "llava"
    assert toy_lm.provenance()["revision"].startswith("weights sha256:")
    scene = D.make_scene(7, colour="green", shape="square", position="center")
    run = lens.trace(toy_lm, [{"image": scene.image, "text": lens.image_prompt(toy_lm)}], progress=False)
    image = np.nonzero(run.modality == 1)[0]
    assert len(image) == D.GRID * D.GRID
    cells = set(zip(run.arrays["image.row"][image].tolist(), run.arrays["image.col"][image].tolist()))
    assert cells == {(r, c) for r in range(D.GRID) for c in range(D.GRID)}
    # the patches the object covers are the tokens the layout puts at those cells (Scene.token_indices)
    for k in scene.token_indices:
        assert (run.arrays["image.row"][image[k]], run.arrays["image.col"][image[k]]) == D.token_cell(k)
    v = lens.vision(run)
    assert np.isfinite(v.share_per_layer).all() and len(v.share_per_layer) == toy_lm.n_layers
    assert np.array_equal(run.image_pixels(0), np.asarray(scene.image))


@pytest.mark.slow
def test_held_out_caption_accuracy_is_at_least_90_percent_per_attribute(held_out):
    acc, chance = held_out["accuracy"], held_out["chance"]
    assert held_out["n"] == 96 and chance == {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 9}
    assert min(acc.values()) >= 0.9, (acc, held_out["errors"])
    log = json.loads((REPO / "lens/models/toyvlm/training_log.json").read_text())
    for attribute, value in log["held_out"]["accuracy"].items():  # the committed log is what this machine measures
        assert acc[attribute] == pytest.approx(value, abs=1 / 96 + 1e-9), attribute

@pytest.mark.slow
def test_lens_bench_vision_measures_every_way_against_the_plain_forward(lm_dir):
    from lens.bench.vision import format_table, run_benchmark

    result = run_benchmark(repeats=1)
    assert set(result["ratio"]) == {"plain", "lens, no trace", "trace attention", "trace all"}
    assert result["ratio"]["plain"] == 1.0 and all(np.isfinite(v) and v > 0 for v in result["ratio"].values())
    assert result["image_tokens"] == D.GRID * D.GRID and "× plain" in format_table(result)
