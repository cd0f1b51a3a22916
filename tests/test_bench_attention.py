"""``lens bench attention``: what every run reports (issue 16), never how fast anything is.

The benchmark runs for real on a small shape (compiled FlexAttention included) and its result is checked
for what a reader needs to compare machines and paths: the machine line, FlexAttention's dense ceiling,
one row per execution path and density with efficiency = speed-up / ideal, the path ``auto`` chose
(dense SDPA when every block is kept), and outputs that match dense SDPA wherever every block is kept.
No timing asserts: the figures themselves are quoted in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import json
import math

import pytest

from lens.bench import attention as bench
from lens.bench.machine import machine_line


@pytest.fixture(scope="module")
def result():
    return bench.run(lengths=(512,), densities=(1.0, 0.3), heads=2, head_dim=32, repeats=2, min_rounds=2,
                     max_minutes=5, progress=False, block_q=64, block_k=64)


@pytest.mark.slow
def test_every_path_and_density_is_measured_against_dense(result):
    rows = result["rows"]
    assert [(r["target_density"], r["path"]) for r in rows] == [
        (d, p) for d in (1.0, 0.3) for p in bench.PATHS
    ]
    for row in rows:
        assert row["rounds"] == 2 and len(row["ratios"]) == 2
        assert math.isclose(row["efficiency"], row["speedup"] / row["ideal_speedup"], rel_tol=1e-12)
        assert row["efficiency_low"] <= row["efficiency"] <= row["efficiency_high"]
        assert row["runs"] in ("dense", "gathered", "flex")
    full = [r for r in rows if r["target_density"] == 1.0]
    for row in full:  # every block kept: each path computes dense causal attention exactly
        assert row["kept_fraction"] == 1.0 and row["ideal_speedup"] == 1.0
        assert row["rel_l1"] < 1e-5 and row["cosine"] > 1 - 1e-6
    assert next(r for r in full if r["path"] == "auto")["runs"] == "dense"  # the dense fallback
    sparse = [r for r in rows if r["target_density"] == 0.3]
    assert all(0.2 < r["kept_fraction"] < 0.4 and r["ideal_speedup"] > 2 for r in sparse)
    # the paths compute the same kept blocks: the same error against dense, to rounding
    assert max(r["rel_l1"] for r in sparse) - min(r["rel_l1"] for r in sparse) < 1e-5
    assert next(r for r in sparse if r["path"] == "auto")["runs"] in ("gathered", "flex")


@pytest.mark.slow
def test_machine_line_and_flex_ceiling_are_printed(result, tmp_path):
    text = bench.format_table(result)
    first = text.splitlines()[0]
    assert first == machine_line(result["machine"]) and first.startswith("machine: ")
    (ceiling,) = result["flex_ceiling"]
    assert ceiling["T"] == 512 and ceiling["rounds"] == 2 and ceiling["speedup"] > 0
    assert ceiling["rel_l1"] < 1e-5  # plain FlexAttention with a causal mask is dense causal attention
    assert "FlexAttention dense ceiling at T=512" in text
    for path in bench.PATHS:
        assert f" {path} " in text
    json.loads(json.dumps(result, allow_nan=False))  # the JSON is strict JSON


@pytest.mark.slow
def test_command_line_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--lengths", "512", "--densities", "0.3", "--paths", "gathered", "--heads", "2",
                       "--head-dim", "32", "--block-q", "64", "--block-k", "64", "--repeats", "1",
                       "--min-rounds", "1", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("machine: ") and "FlexAttention dense ceiling" in printed
    saved = json.loads(out.read_text())
    assert [r["path"] for r in saved["rows"]] == ["gathered"] and saved["rows"][0]["rounds"] == 1
    assert saved["rows"][0]["efficiency_low"] is None  # one round has no interval, and says so


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="paths must be among"):
        bench.run(lengths=(256,), paths=("fast",), progress=False)
