"""The residual stream's rotation: exact surgery, the fitted Q, conversion with it, reload, distillation."""

import copy
import math

import pytest
import torch

import hadaconv
from hadaconv.adapters import find_adapter
from hadaconv.calibrate import Moments
from hadaconv.convert import ConvertConfig, convert
from hadaconv.errors import HadaconvError, InputError
from hadaconv.fit import HeadLayout, dense_map, fit_projection
from hadaconv.rotation import MappedNorm, RotationProblem, fit_rotation, rotate_model, why_not_rotatable
from tiny_models import example_inputs, make_tiny

FAST = dict(samples=12, seq_len=32, batch_size=4, max_iter=10, sensitivity=False, calib=["shakespeare"])


def _orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def _tokenizer():
    from transformers import AutoTokenizer

    from tiny_models import tokenizer_folder

    return AutoTokenizer.from_pretrained(tokenizer_folder())


def _with_norm_weights(model):
    """Norm weights away from 1 (a fresh model's are all 1, which would hide a fold left out)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return model


def _llama_with_biases():
    """A tiny Llama whose writers (o_proj, down_proj) and readers carry biases, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "biases"])
def test_a_rotated_model_computes_the_same_function(family):
    """A tied head; untied with q/k/v biases (Qwen2); q/k norms (Qwen3); Mistral; biases on the
    writers too (Llama's attention_bias and mlp_bias)."""
    model = _with_norm_weights(_llama_with_biases() if family == "biases" else make_tiny(family)).double()
    stream = find_adapter(model).residual_stream
    rotated = copy.deepcopy(model)
    rotate_model(rotated, stream, _orthogonal(model.config.hidden_size))
    x = {"input_ids": torch.randint(0, 300, (2, 7))} if family == "biases" else example_inputs(family, model)
    with torch.no_grad():
        ref, out = model(**x).logits, rotated(**x).logits
    tied = family == "llama"
    assert isinstance(rotated.model.norm, MappedNorm) == tied
    assert (rotated.lm_head.weight is rotated.model.embed_tokens.weight) == tied
    # The transformers RMSNorm computes in float32 whatever the model's dtype: that is the rounding.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (rotated.model.embed_tokens.weight - model.model.embed_tokens.weight).abs().max() > 0.01
    if tied:  # the final norm's map is what keeps a tied head right: without it the logits move
        rotated.model.norm = rotated.model.norm.norm
        with torch.no_grad():
            assert (rotated(**x).logits - ref).abs().max() > 1e-2


def _power_of_two_near_rms(g: torch.Tensor) -> float:
    return 2.0 ** round(math.log2(g.double().pow(2).mean().sqrt().item()))


def test_each_norm_keeps_its_scale_and_its_readers_theirs():
    """g / s folds into the readers and the norm keeps s, the power of two nearest g's RMS: a reader
    shrunk by g would take AdamW's steps, about the learning rate each whatever the weight's size,
    as larger ones."""
    model = _with_norm_weights(make_tiny("llama")).double()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(0.05)  # SmolLM2's first: RMS 0.04
    norm, q_proj = model.model.layers[0].input_layernorm, model.model.layers[0].self_attn.q_proj
    g, w, final = norm.weight.detach().clone(), q_proj.weight.detach().clone(), model.model.norm.weight.detach().clone()
    q = _orthogonal(model.config.hidden_size)
    rotate_model(model, find_adapter(model).residual_stream, q)
    s, f = _power_of_two_near_rms(g), _power_of_two_near_rms(final)
    assert s == 2.0 ** -4  # RMS about 0.05
    torch.testing.assert_close(norm.weight.detach(), torch.full_like(g, s), rtol=0, atol=0)
    torch.testing.assert_close(q_proj.weight.detach(), (w * g / s) @ q, rtol=0, atol=1e-12)
    assert 0.5 < q_proj.weight.pow(2).mean().sqrt() / w.pow(2).mean().sqrt() < 2
    torch.testing.assert_close(model.model.norm.norm.weight.detach(), torch.full_like(final, f), rtol=0, atol=0)
    torch.testing.assert_close(model.model.norm.map.weight.detach(), q.T @ torch.diag(final / f) @ q,
                               rtol=0, atol=1e-12)


def test_a_bfloat16_model_keeps_its_norms_scale_exactly():
    """The norm's constant is a power of two, which bfloat16 holds exactly: the readers, divided
    by it in float64, are not rescaled by its rounding (an RMS of 0.0517 stored in bfloat16 reads
    0.0518)."""
    model = _with_norm_weights(make_tiny("llama")).double()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(0.05)
    stored = model.to(torch.bfloat16)
    g = stored.model.layers[0].input_layernorm.weight.detach().double().clone()
    rotate_model(stored, find_adapter(stored).residual_stream, _orthogonal(stored.config.hidden_size))
    assert stored.model.layers[0].input_layernorm.weight.double().unique().tolist() == [_power_of_two_near_rms(g)]
    assert stored.model.norm.norm.weight.dtype == torch.bfloat16


def test_what_cannot_be_rotated_says_why():
    gpt2 = make_tiny("gpt2")
    assert why_not_rotatable(gpt2, find_adapter(gpt2).residual_stream, "gpt2") == \
        "only Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM) can be rotated so far, and this is a gpt2 " \
        "model"
    llama = make_tiny("llama")  # behind --target's generic adapter, which knows no stream
    assert why_not_rotatable(llama, None, find_adapter(llama, target=r"o_proj$").name).startswith(
        "--target converts layers by name")
    model = make_tiny("llama")
    stream = find_adapter(model).residual_stream
    assert why_not_rotatable(model, stream) == ""
    rotate_model(model, stream, _orthogonal(model.config.hidden_size))
    assert why_not_rotatable(model, stream) == "its residual stream is already rotated"
    with pytest.raises(HadaconvError, match=r"^cannot rotate the residual stream: its residual stream is already"):
        rotate_model(model, stream, _orthogonal(model.config.hidden_size))
    untied = make_tiny("qwen2")
    convert(untied, _tokenizer(), ConvertConfig(block=4, rotate=False, **FAST))
    assert "not all dense Linear layers" in why_not_rotatable(untied, find_adapter(untied).residual_stream)


def _problems(q0, layers=3, d=16, heads=4, block=4, seed=0):
    """Layers W_l = Q0 M_l + noise, M_l of the fitted form G T V: one rotation Q0 serves them all."""
    g = torch.Generator().manual_seed(seed)
    lay = HeadLayout(heads, heads, d // heads)
    out = []
    for _ in range(layers):
        a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
        mom = Moments(torch.zeros(d, dtype=torch.float64), a @ a.T / (3 * d), 1000)
        form = fit_projection(torch.randn(d, d, generator=g, dtype=torch.float64), None, mom, block=block, layout=lay)
        m = dense_map(form, lay, (d, d))
        out.append(RotationProblem(q0 @ m + 0.01 * torch.randn(d, d, generator=g, dtype=torch.float64), mom, lay))
    return out


def test_the_fitted_rotation_lowers_every_layers_error_and_is_orthogonal():
    q0 = _orthogonal(16, seed=3)
    problems = _problems(q0)
    fit = fit_rotation(problems, block=4, iterations=30)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(fit.q.T @ fit.q, eye, rtol=0, atol=1e-10)
    assert all(after < 0.8 * before for before, after in zip(fit.before, fit.after)), (fit.before, fit.after)
    for p, err in zip(problems, fit.after):  # the errors reported are those of the fits on Q^T W
        refit = fit_projection(fit.q.T @ p.weight, None, p.moments, block=4, layout=p.layout)
        assert refit.error == pytest.approx(err, rel=0.05, abs=1e-3)
    unrelated = fit_rotation(_problems(eye), block=4, iterations=3)  # W = M + noise: Q = I is already right
    assert max(unrelated.after) <= max(unrelated.before) + 1e-9


def test_a_rotation_needs_one_residual_width():
    lay = HeadLayout(4, 4, 4)
    mom = Moments.identity(16)
    with pytest.raises(InputError, match=r"^a rotation needs layers writing one residual stream, got output widths "
                                         r"\[8, 16\]$"):
        fit_rotation([RotationProblem(torch.eye(16), mom, lay), RotationProblem(torch.ones(8, 16), mom, lay)])


def test_convert_rotates_by_default_fits_better_and_reloads(tmp_path):
    from hadaconv.convert import convert_file

    source = tmp_path / "src"
    make_tiny("llama", source)
    plain = convert_file(source, tmp_path / "plain", ConvertConfig(block=4, rotate=False, **FAST))
    report = convert_file(source, tmp_path / "rot", ConvertConfig(block=4, **FAST))
    assert not plain.rotated and report.rotated and report.rotate_skipped == ""
    before, after = report.rotation_error
    assert after < before
    d = report.layers[0].width
    assert report.rotation_params == d * d  # the tied head's final-norm map
    removed = sum(r.params_removed for r in report.layers)
    assert report.params_before - report.params_after == removed - d * d
    assert "residual stream rotated" in report.caption()
    # The table's column of parameters removed sums to the total: the map has a row of its own.
    table = report.table().build()
    column = [c for c in table.columns if c.header == "removed"][0]
    assert sum(int(v.replace(",", "")) for v in column._cells) == report.params_before - report.params_after
    assert list(table.columns[0]._cells)[-1] == "norm"
    model = hadaconv.load(tmp_path / "rot")
    assert isinstance(model.model.norm, MappedNorm)
    x = example_inputs("llama", model)
    with torch.no_grad():
        again = hadaconv.load(tmp_path / "rot")(**x).logits
        assert torch.equal(model(**x).logits, again)
    import json
    assert json.loads((tmp_path / "rot" / "config.json").read_text())["hadaconv"]["rotated"] is True
    from hadaconv.export import export_onnx

    for portable in (False, True):  # validated against PyTorch inside, the final-norm map included
        result = export_onnx(model, tmp_path / f"bundle{portable}", tokenizer=_tokenizer(), portable=portable)
        assert result.path.is_dir()


def test_rotation_is_skipped_with_a_reason_where_it_cannot_run():
    tok = _tokenizer()
    gpt2 = make_tiny("gpt2")
    report = convert(gpt2, tok, ConvertConfig(block=4, **FAST))
    assert not report.rotated and report.rotate_skipped.endswith("can be rotated so far, and this is a gpt2 model")
    data_free = convert(make_tiny("llama"), tok, ConvertConfig(block=4, calib="none", sensitivity=False))
    assert not data_free.rotated and "data-free" in data_free.rotate_skipped
    with pytest.raises(InputError, match=r"^rotate must be True or False, got 'no'$"):
        convert(make_tiny("llama"), tok, ConvertConfig(rotate="no"))


def test_the_hidden_state_loss_sees_through_the_rotation():
    from hadaconv.distill.losses import hidden_loss, stream_rotation

    teacher = _with_norm_weights(make_tiny("qwen2"))
    assert stream_rotation(copy.deepcopy(teacher), teacher) is None  # the same stream
    student = copy.deepcopy(teacher)
    q = _orthogonal(teacher.config.hidden_size, seed=5)
    rotate_model(student, find_adapter(student).residual_stream, q)
    found = stream_rotation(student, teacher)
    torch.testing.assert_close(found.double(), q, rtol=0, atol=1e-5)
    x = example_inputs("qwen2", teacher)
    with torch.no_grad():
        t = teacher(**x, output_hidden_states=True).hidden_states
        s = student(**x, output_hidden_states=True).hidden_states
    assert hidden_loss(s, t) > 0.1  # the same function in another basis: far apart unaligned
    assert hidden_loss(s, t, found) < 1e-8


def test_distilling_a_rotated_student_locally_is_refused(tmp_path):
    from hadaconv.distill import DistillConfig, distill

    tok = _tokenizer()
    teacher = make_tiny("llama")
    student = copy.deepcopy(teacher)
    convert(student, tok, ConvertConfig(block=4, **FAST))
    with pytest.raises(HadaconvError, match=r"^the local stage trains each block on the teacher's own block inputs, "
                                            r"and this student's residual stream is rotated"):
        distill(student, teacher, tok, DistillConfig(stages=["local", "global"], max_steps=1, samples=48, seq_len=16,
                                                     batch_size=4, eval_windows=2, progress=False,
                                                     data=["shakespeare"], bf16=False))


def test_the_command_line_says_what_the_rotation_costs_and_when_it_did_nothing(tmp_path, capsys):
    """The dry run counts the tied head's map against what is removed; a --rotate asked by name
    that cannot run says why (the default says nothing), as --compensate does."""
    from cli_runner import run_cli

    tied, untied = tmp_path / "llama", tmp_path / "qwen2"
    make_tiny("llama", tied)
    make_tiny("qwen2", untied)
    dry = ["-o", tmp_path / "a", "--dry-run", "--block", "4", "--seq-len", "32"]
    code, out, err = run_cli(capsys, "convert", tied, *dry)
    said = " ".join(out.split())
    assert code == 0 and "the residual stream's rotation adds 4,096 back (the final norm's d x d map" in said, err
    for args in (["--no-rotate"], ["--calib", "none"]):  # no rotation: nothing added
        code, out, err = run_cli(capsys, "convert", tied, *dry, *args)
        assert code == 0 and "rotation" not in out, out
    code, out, err = run_cli(capsys, "convert", untied, *dry)
    assert code == 0 and "rotation" not in out, out  # the untied head absorbs it

    run = ["--block", "4", "--calib", "shakespeare", "--samples", "8", "--seq-len", "16", "--no-sensitivity"]
    gpt2 = tmp_path / "gpt2"
    make_tiny("gpt2", gpt2)
    code, _, err = run_cli(capsys, "convert", gpt2, "-o", tmp_path / "g1", *run)
    assert code == 0 and "--rotate" not in err, err
    code, _, err = run_cli(capsys, "convert", gpt2, "-o", tmp_path / "g2", *run, "--rotate")
    assert code == 0 and "note: --rotate did nothing: only Llama-family decoders" in " ".join(err.split()), err
    # The dry run says so before the run, where the model is the reason and where the options are.
    code, _, err = run_cli(capsys, "convert", gpt2, "-o", tmp_path / "g3", *run, "--rotate", "--dry-run")
    said = " ".join(err.split())
    assert code == 0 and "note: --rotate will do nothing: only Llama-family decoders" in said, err
    assert "so the layers would be converted without it" in said and "this is a gpt2 model" in said, err
    # The model's reason outranks the run's: without --streamed it would still not rotate.
    code, _, err = run_cli(capsys, "convert", gpt2, "-o", tmp_path / "g3", "--streamed", *run, "--rotate-iterations",
                           "3", "--dry-run")
    said = " ".join(err.split())  # named as typed: the option given was --rotate-iterations
    assert code == 0 and "note: --rotate-iterations will do nothing: only Llama-family" in said, err
    assert said.endswith("so the layers would be converted without --rotate"), err
    code, _, err = run_cli(capsys, "convert", tied, *dry, "--streamed", "--rotate", "--calib", "shakespeare")
    assert code == 0 and "note: --rotate will do nothing: a streamed conversion" in " ".join(err.split()), err
    code, _, err = run_cli(capsys, "convert", gpt2, "-o", tmp_path / "g3", *run, "--dry-run")
    assert code == 0 and "--rotate" not in err, err
    code, _, err = run_cli(capsys, "convert", tied, *dry, "--rotate", "--calib", "none")
    assert code == 0 and "note: --rotate will do nothing: a data-free fit has no statistics" in \
        " ".join(err.split()), err


def test_a_rotation_that_gains_nothing_is_not_applied(monkeypatch):
    import hadaconv.convert as conv

    monkeypatch.setattr(conv, "MIN_ROTATION_GAIN", 1.0)  # no rotation can remove all the error
    model = make_tiny("llama")
    report = convert(model, _tokenizer(), ConvertConfig(block=4, **FAST))
    assert not report.rotated and report.rotate_skipped.startswith("no rotation fits the chosen layers better")
    assert not isinstance(model.model.norm, MappedNorm) and report.rotation_params == 0


def test_without_the_block_loop_the_rotated_layers_are_fitted_again(tmp_path):
    """--no-sequential --no-compensate applies the independent fits: made again after the
    rotation, on the same statistics (o_proj's inputs do not change), or they would fit the
    unrotated weights."""
    from hadaconv.convert import convert_file

    source = tmp_path / "src"
    make_tiny("llama", source)
    options = dict(block=4, sequential=False, compensate=False, **FAST)
    plain = convert_file(source, tmp_path / "plain", ConvertConfig(rotate=False, **options))
    report = convert_file(source, tmp_path / "rot", ConvertConfig(**options))
    assert report.rotated and not report.sequential and not report.compensate
    # The rows are the new fits': the old ones, of the unrotated weights, were the plain run's.
    assert sum(r.calib_error for r in report.layers) < 0.9 * sum(r.calib_error for r in plain.layers)
    model = hadaconv.load(tmp_path / "rot")
    x = example_inputs("llama", model)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, hadaconv.load(tmp_path / "rot")(**x).logits, rtol=0, atol=0)


def test_the_rotation_runs_the_rounds_asked_for(monkeypatch, tmp_path, capsys):
    """rotate_iterations reaches the fit (its progress counts the rounds), and is refused below
    1, or with --no-rotate on the command line."""
    import hadaconv.rotation as rot
    from cli_runner import run_cli

    rounds = []
    real = rot.fit_rotation
    monkeypatch.setattr(rot, "fit_rotation", lambda *a, **k: rounds.append(k["iterations"]) or real(*a, **k))
    report = convert(make_tiny("llama"), _tokenizer(), ConvertConfig(block=4, rotate_iterations=2, **FAST))
    assert rounds == [2] and report.rotated
    with pytest.raises(InputError, match=r"rotate_iterations must be"):
        convert(make_tiny("llama"), _tokenizer(), ConvertConfig(block=4, rotate_iterations=0, **FAST))
    source = tmp_path / "src"
    make_tiny("llama", source)
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o", "--no-rotate", "--rotate-iterations", "3")
    assert code != 0 and "error: --rotate-iterations sets the rotation's fit, which --no-rotate turns off" in err
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o", "--rotate-iterations", "0")
    assert code != 0 and "--rotate-iterations" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o", "--rotate-iterations", "2", "--block", "4",
                           "--calib", "shakespeare", "--samples", "12", "--seq-len", "32", "--no-sensitivity")
    import json
    assert code == 0 and json.loads((tmp_path / "o" / "report.json").read_text())["rotate_iterations"] == 2, err
    code, _, err = run_cli(capsys, "convert", source, "-o", tmp_path / "o2", "--no-rotate", "--rotate-iterations",
                           str(rot.ITERATIONS))  # given by name, even at its default value
    assert code != 0 and "--no-rotate turns off" in err


def test_a_rotation_whose_map_costs_what_the_layers_remove_is_skipped(tmp_path, capsys):
    """A tied head's d x d map costs about one layer's saving: with one layer converted the
    rotation would leave the model no smaller, so neither the run nor its plan rotates (a
    newcomer's one-layer conversion grew by 37,440 parameters)."""
    from hadaconv.nn import parameters_saved
    from hadaconv.plan import plan_conversion
    from hadaconv.rotation import costs_more

    assert costs_more(10, 11, 2) == "" and costs_more(10, 10, 1).startswith("the final norm's map it needs would "
                                                                            "add 10 parameters, no fewer than the 10")
    source = tmp_path / "src"
    model = make_tiny("llama", source)
    d = model.config.hidden_size
    one, both = ConvertConfig(block=32, layers=[0], **FAST), ConvertConfig(block=4, **FAST)
    assert parameters_saved(d, d, 32, False) <= d * d < 2 * parameters_saved(d, d, 4, False)
    report = convert(make_tiny("llama"), _tokenizer(), one)
    assert not report.rotated and report.rotate_skipped.startswith("the final norm's map it needs would add")
    assert report.params_after < report.params_before and report.rotation_error is None  # not fitted at all
    plan = plan_conversion(source, one)
    assert plan.rotation_params == 0 and plan.rotate_skipped == report.rotate_skipped
    plan = plan_conversion(source, both)
    assert plan.rotation_params == d * d and plan.net_removed == plan.removed_at_most - d * d > 0
    assert plan.to_dict()["net_removed"] == plan.net_removed
