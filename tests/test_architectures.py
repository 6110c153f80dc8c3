"""Architecture coverage: rectangular Hadamard projections (layer, fit, export), the non-square
families end to end (convert, reload, export, greedy generation in ONNX Runtime), task heads
kept through convert and export, converting a converted folder again, and the value fold of
``nn.MultiheadAttention(add_bias_kv=True)``."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tiny_models import TOKENIZER_FILES, _BERT, greedy_onnx_and_torch, make_tiny, tokenizer_folder

import hadaconv
from hadaconv.adapters import attention_layers
from hadaconv.convert import ConvertConfig, convert_file
from hadaconv.errors import HadaconvError
from hadaconv.fit import FitResult, Moments, fit_projection, select_coordinates
from hadaconv.hadamard import factorize, hadamard_matrix
from hadaconv.io import load_model, load_tokenizer
from hadaconv.nn import HadamardProjection
from hadaconv.swap import fold_value

FAST = {"samples": 16, "seq_len": 32, "progress": False}
# conftest points HADACONV_CACHE at a per-session folder once tests run; the real models live in
# the user's cache, read here at import (collection) time.
REAL_CACHE = __import__("hadaconv.realmodels").realmodels.cache_dir()

# ------------------------------------------------------------------ the rectangular layer


def _reference(layer: HadamardProjection) -> torch.Tensor:
    """G R H / sqrt(n) as a dense float64 matrix, built from the explicit Hadamard matrix."""
    n, d_in = layer.n, layer.in_features
    t = torch.tensor(hadamard_matrix(n, normalized=True), dtype=torch.float64)
    rt = t[:, :d_in] if layer.keep is None else t[layer.keep]  # padding drops columns; selection keeps rows
    g = layer.gamma.detach().double()
    g = torch.diag(g) if g.dim() == 1 else torch.block_diag(*g)
    return g @ rt


@pytest.mark.parametrize("d_in,d_out,block", [(32, 64, 4), (128, 64, 8), (64, 48, 1), (48, 48, 4)])
def test_rectangular_layer_matches_float64_reference(d_in, d_out, block):
    torch.manual_seed(0)
    layer = HadamardProjection(d_in, block=block, out_features=d_out).double()
    with torch.no_grad():
        layer.gamma.normal_()
        layer.beta.normal_()
        if layer.keep is not None:
            layer.keep.copy_(torch.randperm(layer.n)[:d_out].sort().values)
    assert (layer.keep is not None) == (d_in > d_out)
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    w = _reference(layer)
    torch.testing.assert_close(layer(x), x @ w.T + layer.beta, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.dense_weight(), w, atol=1e-12, rtol=0)
    copy_ = HadamardProjection(d_in, block=block, out_features=d_out).double()
    copy_.load_state_dict(layer.state_dict())  # the selection is part of the state
    torch.testing.assert_close(copy_(x), layer(x), atol=0, rtol=0)


def _truth(d_in: int, d_out: int, block: int, seed: int = 0):
    """A dense layer that is exactly a rectangular Hadamard projection, and input moments."""
    g = torch.Generator().manual_seed(seed)
    proj = HadamardProjection(d_in, block=block, out_features=d_out).double()
    with torch.no_grad():
        proj.gamma.copy_(torch.randn(proj.gamma.shape, generator=g, dtype=torch.float64))
        proj.beta.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
        if proj.keep is not None:
            proj.keep.copy_(torch.randperm(proj.n, generator=g)[:d_out].sort().values)
    x = torch.randn(4000, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                                 dtype=torch.float64)
    moments = Moments(x.mean(0), x.T @ x / len(x), len(x))
    return proj, moments


@pytest.mark.parametrize("d_in,d_out", [(32, 64), (128, 64), (64, 48)])
def test_fit_recovers_an_exact_rectangular_projection(d_in, d_out):
    """W = G R T exactly: the affine fit finds the kept coordinates (output-energy rule: the
    others carry no energy into W's output) and reproduces W to the ridge's precision."""
    proj, moments = _truth(d_in, d_out, block=4)
    w = proj.dense_weight()
    fit = fit_projection(w, proj.beta.detach(), moments, mode="affine", block=4, gamma_ridge=0.0, ridge=1e-9)
    if proj.keep is not None:
        assert torch.equal(fit.keep, proj.keep)
    assert fit.error < 1e-6
    torch.testing.assert_close(fit.gamma, proj.gamma.detach(), atol=1e-5, rtol=0)
    wrong = fit_projection(w, proj.beta.detach(), moments, mode="affine", block=4, selection="first")
    assert proj.keep is None or wrong.error > 0.1  # the selection matters, and the test can fail


@pytest.mark.parametrize("d_in,d_out,heads", [(32, 64, 4), (128, 64, 8), (64, 48, 4), (48, 96, 4), (96, 48, 4)])
def test_rectangular_objective_gradient_matches_autograd(d_in, d_out, heads):
    """The head fit's written-out gradient (through the adjoint (R T)^T = T^T R^T) equals
    autograd's through a float64 reference built from the explicit Hadamard matrix, for
    zero-padding and for selection, with the transform split by heads (A (x) B) and without it
    (heads of 12 and 24 do not divide the power-of-two part of 96)."""
    from hadaconv.fit import HeadLayout, _fit_gamma, _gamma_lambda, _objective, _Rotation

    g = torch.Generator().manual_seed(d_in + d_out)
    layout = HeadLayout(heads, 2, d_in // heads)
    keep = torch.randperm(d_in, generator=g)[:d_out].sort().values if d_in > d_out else None
    rot = _Rotation(d_in, layout.head_dim, torch.float64, torch.device("cpu"), d_out, keep)
    lw = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    target = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    v = torch.randn(2, layout.head_dim, layout.head_dim, generator=g, dtype=torch.float64)
    loss, grad = _objective(v, lw, target, layout, 4, 1e-3, rot)

    n = max(d_in, d_out)
    rt = torch.tensor(hadamard_matrix(n, normalized=True), dtype=torch.float64)
    rt = rt[:, :d_in] if keep is None else rt[keep]  # R T: padding drops columns, selection keeps rows
    vr = v.clone().requires_grad_()
    p = rt @ torch.block_diag(*vr.repeat_interleave(heads // 2, 0)) @ lw
    lam = _gamma_lambda(p.square().sum() / d_out, 1e-3)
    gamma = _fit_gamma(p, target, 4, lam)
    ref = (torch.bmm(gamma, p.reshape(d_out // 4, 4, -1)).reshape(p.shape) - target).square().sum() \
        + lam * gamma.square().sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, vr.grad, atol=1e-8 * vr.grad.abs().max().item(), rtol=0)


def test_head_fit_recovers_a_padded_projection_with_value_maps():
    """W = G R T blockdiag(V) with d_in < d_out (zero-padding): the joint head fit reaches it."""
    proj, moments = _truth(32, 64, block=4, seed=3)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    w = proj.dense_weight() @ torch.block_diag(*v.repeat_interleave(2, 0))
    from hadaconv.fit import HeadLayout

    fit = fit_projection(w, proj.beta.detach(), moments, mode="head", block=4, layout=HeadLayout(4, 2, 8),
                         gamma_ridge=0.0, ridge=1e-10, max_iter=300)
    assert fit.keep is None and fit.error < 1e-5


def test_selection_rules():
    proj, moments = _truth(128, 64, block=1)
    w = proj.dense_weight()
    assert torch.equal(select_coordinates(w, moments, "first"), torch.arange(64))
    for rule in ("input-energy", "output-energy"):
        keep = select_coordinates(w, moments, rule)
        assert keep.shape == (64,) and torch.all(keep[1:] > keep[:-1])
    with pytest.raises(ValueError, match="unknown selection"):
        select_coordinates(w, moments, "best")


class _Rectangular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = HadamardProjection(32, block=4, out_features=64)  # 32 -> 64: zero-padding
        self.select = HadamardProjection(64, block=4, out_features=48)  # 64 -> 48: selection

    def forward(self, x):
        return self.select(self.pad(x))


@pytest.mark.parametrize("form", ["custom", "portable"])
def test_rectangular_layers_export_in_both_forms(tmp_path, form):
    """The square op plus standard Pad / Gather around it: one contract for both forms."""
    pytest.importorskip("onnxruntime")
    import onnx

    from hadaconv import export_onnx
    from hadaconv.export.bundle import open_bundle

    torch.manual_seed(0)
    model = _Rectangular().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape))
        model.select.keep.copy_(torch.randperm(64)[:48].sort().values)
    export_onnx(model, tmp_path / "b", torch.randn(2, 5, 32), portable=form == "portable")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node}
    assert "Pad" in ops and "Gather" in ops and (("HadamardAffine" in ops) == (form == "custom"))
    x = torch.randn(3, 7, 32)
    got = open_bundle(tmp_path / "b", providers="cpu").session.run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=2e-5, rtol=0)


# ------------------------------------------------------------------ non-square families end to end


@pytest.mark.slow
@pytest.mark.parametrize("family,form", [("qwen3", "custom"), ("mistral_nemo", "custom"),
                                         ("gemma2", "portable"), ("gemma3", "portable")])
def test_non_square_family_converts_reloads_exports_and_generates(tmp_path, family, form):
    """Convert (fit on real text), save, reload, export and generate 10 greedy tokens in ONNX
    Runtime, token for token as PyTorch's generate.  Each family runs one form here to keep make
    test short; all eight combinations were run by hand (README, Architectures)."""
    from hadaconv import export_onnx

    make_tiny(family, tmp_path / "src")
    report = convert_file(str(tmp_path / "src"), str(tmp_path / "hc"), ConvertConfig(sensitivity=False, **FAST))
    assert report.converted == [0, 1]
    model = hadaconv.load(tmp_path / "hc")
    projections = [m for m in model.modules() if isinstance(m, HadamardProjection)]
    assert len(projections) == 2 and all(p.in_features != p.out_features for p in projections)
    tok = load_tokenizer(tmp_path / "hc")
    export_onnx(model, tmp_path / "b", portable=form == "portable", tokenizer=tok)
    out, ref = greedy_onnx_and_torch(tmp_path / "b", model, tok)
    np.testing.assert_array_equal(out.tokens, ref)


# ------------------------------------------------------------------ heads kept


def _save_head(path, class_name: str, **config):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(**_BERT, pad_token_id=0, **config)
    getattr(transformers, class_name)(cfg).eval().save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_folder() / name, path / name)
    return path


@pytest.mark.parametrize("class_name", ["BertForTokenClassification", "BertForMaskedLM", "BertModel"])
def test_head_classes_load_as_themselves(tmp_path, class_name):
    assert type(load_model(_save_head(tmp_path / "m", class_name)).model).__name__ == class_name


def test_classifier_keeps_its_head_through_convert_and_export(tmp_path):
    from hadaconv import export_onnx

    src = _save_head(tmp_path / "src", "BertForSequenceClassification", num_labels=3)
    original = load_model(src).model
    convert_file(str(src), str(tmp_path / "hc"), ConvertConfig(layers=[0], sensitivity=False, **FAST))
    model = hadaconv.load(tmp_path / "hc")
    assert type(model).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(model.classifier.weight, original.classifier.weight, atol=0, rtol=0)
    result = export_onnx(model, tmp_path / "b", tokenizer=load_tokenizer(tmp_path / "hc"))
    assert result.kind == "classifier" and [o["name"] for o in result.meta["outputs"]] == ["logits"]
    assert result.meta["outputs"][0]["shape"][-1] == 3


def test_a_head_we_cannot_keep_is_one_error_line(tmp_path):
    src = _save_head(tmp_path / "src", "BertForQuestionAnswering")
    with pytest.raises(HadaconvError, match="BertForQuestionAnswering") as info:
        load_model(src)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ converting again


def test_convert_a_converted_folder_again(tmp_path):
    make_tiny("llama", tmp_path / "src")
    convert_file(str(tmp_path / "src"), str(tmp_path / "c1"), ConvertConfig(layers=[0], sensitivity=False, **FAST))
    first = hadaconv.load(tmp_path / "c1")
    with pytest.raises(HadaconvError, match="can still be converted are 1$"):
        convert_file(str(tmp_path / "c1"), str(tmp_path / "bad"), ConvertConfig(layers=[0], **FAST))
    with pytest.raises(HadaconvError, match=r"names 0, but the layers that can still be converted are 1: give "
                                            r"layers='1'$"):  # the rest of the list, to copy
        convert_file(str(tmp_path / "c1"), str(tmp_path / "bad"), ConvertConfig(layers=[0, 1], **FAST))
    report = convert_file(str(tmp_path / "c1"), str(tmp_path / "c2"), ConvertConfig(sensitivity=False, **FAST))
    assert report.converted == [1]
    meta = json.loads((tmp_path / "c2" / "config.json").read_text())["hadaconv"]
    assert meta["layers"] == [0, 1] and meta["source"] == str(tmp_path / "src")
    second = hadaconv.load(tmp_path / "c2")
    assert sum(isinstance(m, HadamardProjection) for m in second.modules()) == 2
    # Layer 0 stayed as it was.
    torch.testing.assert_close(second.model.layers[0].self_attn.o_proj.gamma,
                               first.model.layers[0].self_attn.o_proj.gamma, atol=0, rtol=0)
    with pytest.raises(HadaconvError, match="converted already"):
        convert_file(str(tmp_path / "c2"), str(tmp_path / "c3"), ConvertConfig(**FAST))


# ------------------------------------------------------------------ nn.MultiheadAttention bias_v


class _Attention(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True, **kwargs)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 12, "vdim": 20}])
def test_mha_bias_v_takes_the_folded_value_map(kwargs):
    """Folding M into the value projection equals applying M to every head's attention output,
    also at the extra bias_k/bias_v position: bias_v is transformed with the value rows."""
    torch.manual_seed(0)
    model = _Attention(**kwargs).double().eval()
    with torch.no_grad():
        model.attn.in_proj_bias.normal_()
        model.attn.bias_v.normal_()
    folded = copy.deepcopy(model)
    layer, layer_f = attention_layers(model)[0], attention_layers(folded)[0]
    m = torch.randn(4, 4, 4, dtype=torch.float64)  # one head_dim x head_dim map per head
    model.attn.out_proj.register_forward_pre_hook(
        lambda mod, args: (torch.einsum("hij,...hj->...hi", m, args[0].unflatten(-1, (4, 4))).flatten(-2),))
    before = folded.attn.bias_v.detach().clone()
    fold_value(layer_f, FitResult(torch.ones(16), torch.zeros(16), m, "head", 1, 0.0, 0))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    memory = torch.randn(2, 7, kwargs.get("kdim", 16), dtype=torch.float64)
    if "vdim" in kwargs:
        memory = (memory, torch.randn(2, 7, kwargs["vdim"], dtype=torch.float64))
    else:
        memory = (memory, memory)
    run = lambda mod: mod.attn(x, *memory, need_weights=False)[0]  # noqa: E731
    with torch.no_grad():
        expected, got = run(model), run(folded)
    assert not torch.equal(folded.attn.bias_v, before)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert layer.value.shape == (16, (kwargs.get("vdim", 16)) + 1)  # the value rows plus bias_v


# ------------------------------------------------------------------ the second real model


def _qwen_two_blocks(folder, out):
    """A folder whose config keeps Qwen2.5's first two blocks and links the rest of ``folder``
    (weights, tokenizer): loading it reads only those blocks' tensors (the others are reported
    as unexpected keys and skipped)."""
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config["layer_types"] = config.get("layer_types", ["full_attention"] * 2)[:2]
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    for item in folder.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    return out


@pytest.mark.slow
def test_qwen2_5_coder_two_layers_convert_reload_export_generate(tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct cut to its first two blocks, so the test fits make test's
    budget: the real embeddings, untied head, 151,936-token tokenizer, q/k/v biases and 14/2-head
    layout; both blocks converted on real text (Shakespeare; 10 L-BFGS steps instead of the
    default 40: the fit's quality is bench_quality's job, here it must only beat the mean),
    saved, reloaded bit for bit, exported with the custom op and the KV cache (validated against
    PyTorch for prefill and decode by the exporter), and 6 greedy tokens generated in ONNX
    Runtime token for token as in PyTorch.  The whole model would take minutes to export on a
    2-core CPU; two blocks already cover every code path a 24-block model uses.

    The model comes from make's set-up (``python -m hadaconv.realmodels``); without it the test
    skips."""
    from hadaconv import export_onnx
    from hadaconv.convert import convert
    from hadaconv.generate import generate
    from hadaconv.io import hadaconv_meta, save_converted
    from hadaconv.realmodels import qwen2_5_coder_folder

    try:
        folder = qwen2_5_coder_folder(REAL_CACHE)
    except HadaconvError as exc:
        pytest.skip(str(exc))
    src = _qwen_two_blocks(folder, tmp_path / "src")
    loaded = load_model(src)
    model, tok = loaded.model, loaded.tokenizer
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.vocab_size, len(model.model.layers)) == (896, 14, 2, 151936, 2)
    cfg = ConvertConfig(samples=10, seq_len=64, calib="shakespeare", sequential=False, compensate=False,
                        sensitivity=False, max_iter=10, progress=False)  # 9 windows fitted, 1 held out
    report = convert(model, tok, cfg)
    assert report.converted == [0, 1]
    assert all(r.heldout_error < r.mean_error for r in report.layers)
    assert all(isinstance(layer.self_attn.o_proj, HadamardProjection) for layer in model.model.layers)
    meta = hadaconv_meta(adapter=report.adapter, layers=report.converted, block=report.block, fit=cfg.mode,
                         width=896, m=factorize(896).m)
    save_converted(model, tmp_path / "hc", meta=meta, tokenizer_source=src)
    reloaded = hadaconv.load(tmp_path / "hc")
    prompt = "def quicksort(items):"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits, atol=0, rtol=0)
    export_onnx(reloaded, tmp_path / "b", tokenizer=tok)
    out = generate(tmp_path / "b", prompt, 6, eos_token_id=[])
    with torch.no_grad():
        ref = reloaded.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(out.tokens[0], ref[0, ids["input_ids"].shape[1]:].numpy())


# ------------------------------------------------------------------ the README's list


def test_readme_lists_exactly_the_supported_model_types():
    """The first column of the README's architecture table is the set of ``model_type``s the
    family adapters match: nothing claimed that is not matched, nothing matched that is unlisted."""
    import re
    from pathlib import Path

    from hadaconv.adapters import adapters

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Architectures", 1)[1].split("\n\n| `model_type` |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    listed = {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}
    matched = set().union(*(getattr(a.matches, "model_types", frozenset()) for a in adapters()))
    assert matched and listed == matched
