"""examples/train_from_scratch.py stays working: a few steps of the tiny configuration."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_from_scratch.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_from_scratch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_json_and_counts(script, tmp_path):
    out = tmp_path / "tfs"
    results = script.main(["--tiny", "--steps", "4", "--distill-steps", "2", "--in-process", "--quiet",
                           "--out", str(out), "--work", str(tmp_path / "work")])
    saved = json.loads(out.with_suffix(".json").read_text())
    dense, had = saved["dense"], saved["hadamard"]
    d, layers = 64, 2
    # Llama attention has no biases: 4 d^2 dense, 3 d^2 + gamma + beta with the Hadamard projection.
    assert dense["parameters"]["attention"] == layers * 4 * d * d
    assert had["parameters"]["attention"] == layers * (3 * d * d + 2 * d)
    assert dense["parameters"]["total"] - had["parameters"]["total"] == layers * (d * d - 2 * d)
    assert had["forward_flops_per_token"] < dense["forward_flops_per_token"]
    # The Hadamard run trains until its FLOPs cover the dense route (training + convert + distill).
    assert had["steps"] > dense["steps"] == 4
    assert had["train_flops"] >= dense["converted"]["total_flops"] * (1 - 1e-9)
    assert [p["step"] for p in dense["curve"]][-1] == 4
    for r in (dense, had):
        assert all(p["val_loss"] > 0 for p in r["curve"])
        assert r["memory_mib"]["activations"] > 0
    assert dense["converted"]["parameters"]["total"] == had["parameters"]["total"]
    assert results["dense"]["final_val_loss"] == dense["final_val_loss"]
