"""onnxruntime-genai runs hadaconv bundles as they are: ``genai_config.json`` describes the graph
and points at the bundle's own op library by a relative path.  Greedy tokens from
onnxruntime-genai must equal PyTorch's ``generate`` (up to EOS, where genai stops) (converted tiny models of several families,
custom and portable forms, and a dense one; the converted SmolLM2 case is in test_export.py and
reuses its bundle)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxscript")

from test_export import converted  # noqa: E402
from tiny_models import make_tiny  # noqa: E402

from hadaconv.export import export_onnx  # noqa: E402
from hadaconv.export.genai import GENAI_CONFIG  # noqa: E402


def genai_greedy(bundle, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
    """Up to ``new_tokens`` greedy tokens per prompt (equal lengths, one batch) from
    onnxruntime-genai; [batch, steps].  Generation stops at EOS (the bundle's): forcing it on with
    ``min_length`` would mask EOS out of the choice and change the tokens."""
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + new_tokens, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(np.array(generator.get_next_tokens()))
    return np.stack(steps, axis=1)[:, :new_tokens]


def assert_same_greedy(got: np.ndarray, ref: np.ndarray, bundle) -> None:
    """Row by row, onnxruntime-genai's tokens equal the reference up to and including its first
    EOS (where genai stops; the reference, told to ignore EOS, goes on)."""
    eos = json.loads((bundle / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    for row, want in zip(got, ref):
        want = list(want)
        end = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        assert list(row[:end]) == want[:end], (list(row), want)


def torch_greedy(model, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


PROMPTS = [[5, 6, 7, 8, 9, 10], [101, 2000, 3000, 17, 4, 99]]


def check_config(bundle, meta: dict, model) -> dict:
    """genai_config.json names exactly the graph's inputs and outputs and its cache sizes."""
    config = json.loads((bundle / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    names = {i["name"] for i in meta["inputs"]} | {o["name"] for o in meta["outputs"]}
    templates = [*decoder["inputs"].values(), *decoder["outputs"].values()]
    assert {t % i if "%d" in t else t for t in templates for i in range(decoder["num_hidden_layers"])} == names
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (meta["cache"]["num_kv_heads"],
                                                                      meta["cache"]["head_dim"])
    assert config["model"]["context_length"] == model.config.max_position_embeddings
    assert meta["genai_config"] == GENAI_CONFIG and config["search"]["do_sample"] is False
    return config


# Validation is off: the token comparison below is the check, and it halves the time.
@pytest.mark.parametrize("family,form,block", [
    ("llama", "custom", 4), ("gpt2", "custom", 1), ("qwen3", "portable", 4), ("llama", "dense", None),
])
def test_genai_generates_like_torch(tmp_path, monkeypatch, family, form, block):
    model = make_tiny(family) if form == "dense" else converted(family, block)
    result = export_onnx(model, tmp_path / "b", portable=form == "portable", validate_outputs=False)
    config = check_config(tmp_path / "b", result.meta, model)
    library = config["model"]["decoder"]["session_options"].get("custom_ops_library")
    assert library == (None if form in ("portable", "dense") else "libhadaconv_ort.so")  # dense: nothing to run
    # Copied elsewhere and loaded from another working directory: the relative library path
    # resolves against the bundle, not the cwd.
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    shutil.rmtree(tmp_path / "b")
    monkeypatch.chdir(tmp_path.anchor)
    tokens = genai_greedy(tmp_path / "copy", PROMPTS, 12)
    assert_same_greedy(tokens, torch_greedy(model, PROMPTS, 12), tmp_path / "copy")

