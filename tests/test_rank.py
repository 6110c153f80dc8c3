"""The optional low-rank residual (``--rank``): the fit against float64 reduced-rank regression
by brute force on samples, the layer, conversion, save / load, both ONNX forms, distillation."""

from __future__ import annotations

import json

import pytest
import torch

import hadaconv
from hadaconv import HadamardProjection
from hadaconv.convert import ConvertConfig, convert, convert_file
from hadaconv.errors import InputError
from hadaconv.fit import fit_projection, relative_error
from hadaconv.nn import parameters_saved
from test_fit import D, HEADS, KV, LAYOUT, moments, transform
from tiny_models import example_inputs, make_tiny, tokenizer_folder

# rotate=False: each run would choose its own rotation, and the comparisons here are of the residual alone
FAST = dict(samples=12, seq_len=32, batch_size=4, max_iter=10, sensitivity=False, progress=False,
            calib="shakespeare", rotate=False)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder())


def _problem(seed=3):
    mom, x = moments(seed=seed)
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    return mom, x, w, b


def _value_matrix(fit) -> torch.Tensor:
    """V over the query-head channels, built here from the fit's KV form (not by hadaconv.fit)."""
    if fit.value_map is None:
        return torch.eye(D, dtype=torch.float64)
    if fit.value_map.dim() == 1:
        return torch.diag(fit.value_map.reshape(KV, 1, -1).expand(-1, HEADS // KV, -1).reshape(D))
    return torch.block_diag(*fit.value_map.repeat_interleave(HEADS // KV, 0))


def _outputs(fit, x):
    """y' on samples x [n, D] from the fit's parts: G T V x + beta + U D (V x)."""
    g = torch.diag(fit.gamma) if fit.gamma.dim() == 1 else torch.block_diag(*fit.gamma)
    vx = x @ _value_matrix(fit).T
    y = vx @ (g @ transform()).T + fit.beta
    return y if fit.up is None else y + vx @ (fit.up @ fit.down).T


@pytest.mark.parametrize("mode", ["affine", "diag", "head"])
def test_full_rank_is_exact(mode):
    """r = d: the residual absorbs all that G T V misses; the output is W x + b to rounding (the
    solve with V C V^T squares the value map's condition number: 1e-10 measured for head)."""
    mom, x, w, b = _problem()
    fit = fit_projection(w, b, mom, mode=mode, block=4, layout=LAYOUT, max_iter=20, ridge=0.0, rank=D)
    y = x @ w.T + b
    brute = ((_outputs(fit, x) - y).norm() / y.norm()).item()
    assert brute < 1e-9 and fit.error < 1e-9
    assert relative_error(w, b, fit, mom, LAYOUT) < 1e-9


@pytest.mark.parametrize("mode,rank", [("affine", 8), ("head", 8), ("head", 30), ("diag", 16)])
def test_rank_r_is_the_reduced_rank_regression_optimum(mode, rank):
    """U D equals the float64 reduced-rank regression of the remainder's outputs A x~ on the
    layer's inputs V x~, computed from the samples by least squares and an SVD (Izenman's
    estimator), the error is what the samples give, and perturbing U or D only makes it worse."""
    mom, x, w, b = _problem()
    plain = fit_projection(w, b, mom, mode=mode, block=4, layout=LAYOUT, max_iter=20, ridge=0.0)
    fit = fit_projection(w, b, mom, mode=mode, block=4, layout=LAYOUT, max_iter=20, ridge=0.0, rank=rank)
    torch.testing.assert_close(fit.gamma, plain.gamma, rtol=0, atol=0)  # G, V fitted first, unchanged
    xc = x - x.mean(0)
    y, vx = x @ w.T + b, xc @ _value_matrix(fit).T
    remainder = xc @ w.T - (_outputs(plain, x) - plain.beta)  # A x~ = (W - G T V) x~
    remainder = remainder - remainder.mean(0)
    b_ols = torch.linalg.lstsq(vx, remainder).solution.T  # [d_out, d_in], on the layer's inputs
    _, _, vt = torch.linalg.svd(vx @ b_ols.T, full_matrices=False)  # the fitted values' top directions
    b_r = vt[:rank].T @ vt[:rank] @ b_ols  # Izenman's estimator with identity weights
    # To 1e-6 of its largest entry: the fitted value maps have condition numbers near 1e3.
    torch.testing.assert_close(fit.up @ fit.down, b_r, rtol=0, atol=1e-6 * b_r.abs().max().item())
    brute = ((_outputs(fit, x) - y).norm() / y.norm()).item()
    assert fit.error == pytest.approx(brute, rel=1e-9)
    assert relative_error(w, b, fit, mom, LAYOUT) == pytest.approx(brute, rel=1e-9)
    assert fit.error < plain.error
    g = torch.Generator().manual_seed(0)
    for name in ("up", "down"):
        worse = type(fit)(**{**fit.__dict__})
        setattr(worse, name, getattr(fit, name) + 1e-3 * torch.randn(getattr(fit, name).shape, generator=g,
                                                                    dtype=torch.float64))
        assert relative_error(w, b, worse, mom, LAYOUT) > fit.error


def test_errors_fall_with_the_rank_and_bad_ranks_are_refused():
    mom, _, w, b = _problem(seed=5)
    errors = [fit_projection(w, b, mom, mode="head", block=4, layout=LAYOUT, max_iter=20, rank=r).error
              for r in (0, 1, 4, 16, 48)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    for bad in (-1, D + 1, 2.0, True):
        with pytest.raises(InputError, match="rank"):
            fit_projection(w, b, mom, mode="head", block=4, layout=LAYOUT, rank=bad)


def test_a_residual_that_does_not_help_is_switched_off(monkeypatch):
    """Should the residual not lower the calibration error (here: a solver made to return a
    harmful one), U is zero: the fit equals the rank-0 fit, with D kept for training."""
    import hadaconv.fit as fit_module

    mom, _, w, b = _problem(seed=6)
    plain = fit_projection(w, b, mom, mode="head", block=4, layout=LAYOUT, max_iter=20)
    monkeypatch.setattr(fit_module, "reduced_rank", lambda a, cov, rank, vmat=None: (
        torch.ones(a.shape[0], rank, dtype=a.dtype), torch.ones(rank, a.shape[1], dtype=a.dtype)))
    fit = fit_projection(w, b, mom, mode="head", block=4, layout=LAYOUT, max_iter=20, rank=3)
    assert fit.rank == 3 and not fit.up.any() and fit.down.shape == (3, D)
    assert fit.error == pytest.approx(plain.error, rel=1e-9)
    torch.testing.assert_close(fit.beta, plain.beta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d_in,d_out", [(48, 48), (32, 64), (128, 64)])  # square, padded, selected
def test_layer_forward_is_its_dense_weight(d_in, d_out):
    torch.manual_seed(0)
    layer = HadamardProjection(d_in, block=4, out_features=d_out, rank=3).double()
    fresh = layer(torch.ones(2, d_in, dtype=torch.float64))
    with torch.no_grad():
        plain = HadamardProjection(d_in, block=4, out_features=d_out).double()
        torch.testing.assert_close(fresh, plain(torch.ones(2, d_in, dtype=torch.float64)), rtol=0, atol=0)  # U = 0
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(5, 7, d_in, dtype=torch.float64)
    want = x @ layer.dense_weight().T + layer.beta
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert [tuple(p.shape) for n, p in layer.named_parameters() if n in ("down", "up")] == [(3, d_in), (d_out, 3)]
    assert "rank=3" in repr(layer) and "rank" not in repr(plain)
    assert parameters_saved(d_in, d_out, 4, False, 3) == parameters_saved(d_in, d_out, 4, False) - 3 * (d_in + d_out)
    with pytest.raises(InputError, match="rank"):
        HadamardProjection(d_in, out_features=d_out, rank=min(d_in, d_out) + 1)


@pytest.mark.parametrize("family", ["llama", "mistral_nemo", "qwen3"])  # square, padded, selected
def test_convert_save_load_round_trip(family, tmp_path, tokenizer):
    make_tiny(family, tmp_path / "src")
    report = convert_file(str(tmp_path / "src"), str(tmp_path / "out"), ConvertConfig(block=4, rank=5, **FAST))
    plain = convert_file(str(tmp_path / "src"), str(tmp_path / "plain"), ConvertConfig(block=4, **FAST))
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["hadaconv"]
    assert meta["rank"] == 5 and report.rank == 5
    d_in, d_out = report.layers[0].width, make_tiny(family).config.hidden_size
    for row, before in zip(report.layers, plain.layers):
        assert row.params_removed == before.params_removed - 5 * (d_in + d_out)
        assert row.calib_error < before.calib_error
    assert report.params_before - report.params_after == sum(r.params_removed for r in report.layers)
    model = hadaconv.load(tmp_path / "out")
    proj = [m for m in model.modules() if isinstance(m, HadamardProjection)]
    assert len(proj) == 2 and all(p.rank == 5 and p.up.abs().max() > 0 for p in proj)
    from hadaconv.io import load_model

    again = load_model(tmp_path / "out").model
    x = example_inputs(family, model)
    with torch.inference_mode():
        assert torch.equal(model(**x).logits, again(**x).logits)
    # The converted model in memory (before saving) computes the same logits.
    fresh = make_tiny(family)
    convert(fresh, tokenizer, ConvertConfig(block=4, rank=5, **FAST))
    with torch.inference_mode():
        torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=0, atol=1e-6)


def test_converting_again_with_another_rank_reloads(tmp_path):
    """A folder converted again with another --rank holds layers of both ranks; each layer
    reloads with its own (the folder's metadata names only the last run's)."""
    make_tiny("llama", tmp_path / "src")
    convert_file(str(tmp_path / "src"), str(tmp_path / "a"), ConvertConfig(block=4, layers=[0], **FAST))
    convert_file(str(tmp_path / "a"), str(tmp_path / "b"), ConvertConfig(block=4, rank=3, layers=[1], **FAST))
    proj = [m for m in hadaconv.load(tmp_path / "b").modules() if isinstance(m, HadamardProjection)]
    assert sorted(p.rank for p in proj) == [0, 3]


def test_bad_rank_in_the_python_api():
    model = make_tiny("llama")
    with pytest.raises(InputError, match=r"^rank must be an integer >= 0, got -1"):
        convert(model, None, ConvertConfig(rank=-1, calib="none"))
    # 64 x 64 without bias, block 8: 4096 - 512 - 64 = 3520 removed without the residual, 128 per rank.
    with pytest.raises(InputError, match=r"^rank=28 saves no parameters at model\.layers\.0\.self_attn\.o_proj "
                                         r"\(64x64, block 8\).* largest rank that saves any is 27"):
        convert(model, None, ConvertConfig(rank=28, block=8, calib="none"))
    assert not any(isinstance(m, HadamardProjection) for m in model.modules())


@pytest.mark.parametrize("form", ["custom", "portable"])
def test_export_both_forms_with_the_residual(form, tmp_path, tokenizer):
    pytest.importorskip("onnxruntime")
    from hadaconv.export import export_onnx
    from hadaconv.runtime import get_library_path

    if form == "custom":
        get_library_path()
    model = make_tiny("llama")
    convert(model, tokenizer, ConvertConfig(block=4, rank=6, **FAST))
    assert all(m.up.abs().max() > 0 for m in model.modules() if isinstance(m, HadamardProjection))
    result = export_onnx(model, tmp_path / "b", portable=form == "portable", tokenizer=tokenizer)
    assert result.diffs and all(d.max_abs < 1e-4 for d in result.diffs)  # validated against torch
    import onnx

    graph = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    shapes = {tuple(t.dims) for t in graph.graph.initializer}
    assert {(6, 64), (64, 6)} <= shapes, shapes  # D and U (transposed for MatMul), as plain weights


def test_distillation_trains_the_residual(tokenizer):
    from hadaconv.distill import DistillConfig, distill

    teacher = make_tiny("llama")
    student = make_tiny("llama")
    convert(student, tokenizer, ConvertConfig(block=4, rank=4, **FAST))
    proj = student.model.layers[0].self_attn.o_proj
    start = {n: getattr(proj, n).detach().clone() for n in ("up", "down")}
    moved = {}

    def seen(info):
        for n in start:
            moved[n] = moved.get(n, False) or not torch.equal(getattr(proj, n).detach(), start[n])

    distill(student, teacher, tokenizer,
            DistillConfig(stages=["local", "global"], train="attention", max_steps=2, samples=24, seq_len=16,
                          batch_size=4, eval_windows=2, eval_every=100, local_windows=4, local_steps=2,
                          progress=False, data=["shakespeare"], lr=1e-3), callback=seen)
    assert moved == {"up": True, "down": True}
    assert proj.up.requires_grad and proj.down.requires_grad


def test_streamed_conversion_keeps_the_residual(tmp_path):
    """``convert --streamed`` (one block in memory) writes the residual shard by shard; the
    folder loads with it and computes what the in-memory conversion's folder computes."""
    from hadaconv.stream import convert_streamed

    make_tiny("llama", tmp_path / "src")
    cfg = ConvertConfig(block=4, rank=3, **FAST)
    report = convert_streamed(str(tmp_path / "src"), str(tmp_path / "streamed"), cfg)
    convert_file(str(tmp_path / "src"), str(tmp_path / "whole"), cfg)
    assert report.rank == 3 and json.loads((tmp_path / "streamed" / "config.json").read_text())["hadaconv"]["rank"] == 3
    streamed, whole = hadaconv.load(tmp_path / "streamed"), hadaconv.load(tmp_path / "whole")
    assert [m.rank for m in streamed.modules() if isinstance(m, HadamardProjection)] == [3, 3]
    x = example_inputs("llama", whole)
    with torch.inference_mode():
        torch.testing.assert_close(streamed(**x).logits, whole(**x).logits, rtol=0, atol=1e-5)
