"""Conversion end to end: tiny models of every family, exact folding, reload, bad inputs."""

import copy
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

import hadaconv
from hadaconv.adapters import block_list, find_adapter
from hadaconv.convert import ConvertConfig, convert
from hadaconv.nn import HadamardProjection
from tiny_models import FAMILIES, HF_FAMILIES, example_inputs, make_tiny

TEXT_FAMILIES = [f for f in HF_FAMILIES if f != "vit"]
FAST = dict(samples=12, seq_len=32, batch_size=4, max_iter=10, sensitivity_windows=2)


def _inputs_batches(family, model, n=6):
    return [example_inputs(family, model, seed=i) for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_runs_and_reloads(family, tmp_path):
    model = make_tiny(family)
    x = example_inputs(family, model)
    kwargs = {}
    if family in TEXT_FAMILIES:
        from transformers import AutoTokenizer
        from tiny_models import tokenizer_folder
        kwargs["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_folder())
    else:
        kwargs["inputs"] = _inputs_batches(family, model)
    report = convert(model, config=ConvertConfig(block=4, **FAST), **kwargs)
    assert report.converted == list(range(len(report.layers))) and len(report.layers) >= 2
    assert all(r.calib_error < 1.0 and r.heldout_error is not None for r in report.layers)
    assert sum(isinstance(m, HadamardProjection) for m in model.modules()) == len(report.layers)
    with torch.inference_mode():
        y = model(**x)
    if family in HF_FAMILIES:
        from hadaconv.io import hadaconv_meta, save_converted
        meta = hadaconv_meta(adapter=report.adapter, layers=report.converted, block=4, fit="head",
                             width=report.layers[0].width, m=1)
        save_converted(model, tmp_path / "out", meta=meta, report=report.to_dict())
        again = hadaconv.load(tmp_path / "out")
        with torch.inference_mode():
            y2 = again(**x)
        first = y.logits if hasattr(y, "logits") else y[0]
        second = y2.logits if hasattr(y2, "logits") else y2[0]
        assert torch.equal(first, second)


def test_folding_is_exact():
    """The converted block's projection sees V x (V folded into the value projection), and its
    output equals the fitted formula gamma T V x + beta, on fresh inputs."""
    torch.manual_seed(0)
    original = make_tiny("llama").double()
    model = copy.deepcopy(original)
    from transformers import AutoTokenizer
    from tiny_models import tokenizer_folder
    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    convert(model, tok, ConvertConfig(block=4, layers=[1], rotate=False, **FAST))  # the original's basis
    seen = {}
    orig_attn, new_attn = original.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert isinstance(new_attn.o_proj, HadamardProjection)
    h1 = orig_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = new_attn.o_proj.register_forward_hook(lambda m, a, o: seen.update(xv=a[0], y=o))
    ids = torch.randint(1000, 30000, (2, 9))
    with torch.inference_mode():
        original(input_ids=ids)
        model(input_ids=ids)
    h1.remove(), h2.remove()
    proj = new_attn.o_proj
    # V x on the original input, from the fitted value map ...
    x = seen["x"].reshape(-1, 4, 16)
    w_before = orig_attn.v_proj.weight.detach().reshape(2, 16, -1)
    w_after = new_attn.v_proj.weight.detach().reshape(2, 16, -1)
    v = torch.linalg.lstsq(w_before.transpose(1, 2), w_after.transpose(1, 2)).solution.transpose(1, 2)
    vx = torch.einsum("hij,rhj->rhi", v.repeat_interleave(2, 0), x).reshape(seen["xv"].shape)
    torch.testing.assert_close(seen["xv"], vx, atol=1e-10, rtol=1e-10)
    # ... and the projection computes the formula.
    want = hadaconv.hadamard_affine(vx, proj.gamma.detach(), proj.beta.detach())
    torch.testing.assert_close(seen["y"], want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["head", "diag"])
def test_reported_heldout_error_is_what_the_model_does(mode):
    """The report's held-out error is computed from statistics and the fit alone; the converted
    model (value map folded into v_proj, gamma / beta installed) must reach it on the held-out
    windows themselves.  Layer 0 sees the same input in both models, so its output projection's
    outputs compare directly.  A fold that applied the value map transposed, or a beta built
    with the wrong sign, still gives a self-consistent model, and only this comparison notices."""
    torch.manual_seed(0)
    original = make_tiny("llama").double()
    model = copy.deepcopy(original)
    batches = [{"input_ids": torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(10)]  # the last one is held out
    report = convert(model, None, ConvertConfig(mode=mode, block=4, layers=[0], sensitivity=False, rotate=False,
                                                **FAST), inputs=batches)  # in the original's basis
    outputs = []
    for m in (original, model):
        hook = m.model.layers[0].self_attn.o_proj.register_forward_hook(lambda mod, a, o: outputs.append(o))
        with torch.inference_mode():
            m(**batches[-1])
        hook.remove()
    y, y_new = outputs
    actual = ((y_new - y).norm() / y.norm()).item()
    assert actual == pytest.approx(report.layers[0].heldout_error, rel=1e-6)
    assert actual < report.layers[0].mean_error  # and the fit beats predicting the mean


def test_partial_conversion_follows_sensitivity():
    model = make_tiny("qwen2")
    from transformers import AutoTokenizer
    from tiny_models import tokenizer_folder
    report = convert(model, AutoTokenizer.from_pretrained(tokenizer_folder()),
                     ConvertConfig(block=4, max_layers=1, **FAST))
    assert len(report.converted) == 1
    sens = {r.index: r.sensitivity for r in report.layers}
    assert report.converted == [min(sens, key=sens.get)]
    assert sum(isinstance(m, HadamardProjection) for m in model.modules()) == 1


@pytest.mark.parametrize("options, heldout, windows", [
    ({}, 20, 4),                                     # reported only: the cheap probe
    ({"max_layers": 3}, 20, 16),                     # choosing layers: the steadier one
    ({"max_loss": 0.5}, 20, 16),
    ({"max_layers": 3}, 10, 10),                     # held-out windows only...
    ({"max_layers": 3}, 2, 2),                       # ...however few (the run warns under 4)
    ({"max_layers": 3}, 0, 4),                       # none held out: the report's 4 calibration ones
    ({"max_layers": 3, "sensitivity_windows": 6}, 20, 6),  # an explicit count wins either way
    ({"sensitivity_windows": 2}, 20, 2),
])
def test_the_sensitivity_probe_is_larger_when_it_chooses_layers(options, heldout, windows):
    """Ranking on up to 16 held-out windows, reporting on 4 (hadaconv.convert.RANKING_WINDOWS):
    held-out windows first, then calibration ones, in batches of the configured size."""
    from hadaconv.convert import Calibration, _batches, probe_batches, probe_windows

    ids = torch.arange(40 * 3).reshape(40, 3)
    calib, held = ids[:20], ids[20:20 + heldout]
    data = Calibration(_batches(calib, 8), _batches(held, 8))
    cfg = ConvertConfig(batch_size=8, **options)
    assert probe_windows(cfg, heldout) == windows
    probe = probe_batches(data, cfg, from_inputs=False)
    assert [len(b["input_ids"]) for b in probe] == [8] * (windows // 8) + ([windows % 8] if windows % 8 else [])
    assert torch.equal(torch.cat([b["input_ids"] for b in probe]), torch.cat([held, calib])[:windows])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "torch_mha_decoder"])
def test_the_reported_sensitivity_measured_in_the_block_loop_is_the_ranking_one(family, monkeypatch):
    """Unranked, the sensitivity is measured inside the block loop from the teacher pass's
    statistics (no whole-model statistics pass), also when ``max_layers`` leaves nothing to
    choose; ranked with every layer chosen, before the loop as always.  The two give the same
    sensitivities, rows and converted model (a causal LM's KL, an encoder's output error, a plain
    torch model calibrated on inputs)."""
    import hadaconv.convert as conv
    from hadaconv.sensitivity import model_output

    torch.manual_seed(0)
    original = make_tiny(family)
    if family in TEXT_FAMILIES:
        from transformers import AutoTokenizer
        from tiny_models import tokenizer_folder
        kwargs = {"tokenizer": AutoTokenizer.from_pretrained(tokenizer_folder())}
    else:
        kwargs = {"inputs": _inputs_batches(family, original, 12)}
    calls, collect = [], conv.collect_statistics
    monkeypatch.setattr(conv, "collect_statistics", lambda *a, **k: calls.append(1) or collect(*a, **k))
    # rotate=False: the ranked run fits its layers before the rotation, and the rotation's statistics pass is one
    cfg = ConvertConfig(block=4, **{**FAST, "sensitivity_windows": 4}, progress=False, rotate=False)
    in_loop, ranked = copy.deepcopy(original), copy.deepcopy(original)
    a = convert(in_loop, config=cfg, **kwargs)
    assert calls == []  # no statistics pass of its own
    # A --max-layers that leaves nothing to choose skips the ranking; a --max-loss that admits every layer ranks.
    skipped = convert(copy.deepcopy(original), config=dataclasses.replace(cfg, max_layers=len(a.layers)), **kwargs)
    assert calls == [] and skipped.converted == a.converted and skipped.max_layers == len(a.layers)
    assert skipped.warnings()[0].startswith(f"max_layers {len(a.layers)} is not fewer than")
    b = convert(ranked, config=dataclasses.replace(cfg, max_loss=1e9), **kwargs)
    assert calls == [1]
    assert a.converted == b.converted == list(range(len(a.layers)))
    assert a.sensitivity_metric == b.sensitivity_metric != ""
    for ra, rb in zip(a.layers, b.layers):
        assert ra.sensitivity is not None and ra.sensitivity > 0
        assert ra.sensitivity == pytest.approx(rb.sensitivity, rel=1e-5, abs=1e-9)
        assert (ra.calib_error, ra.heldout_error) == pytest.approx((rb.calib_error, rb.heldout_error), rel=1e-5)
    x, kind = example_inputs(family, original, seed=99), find_adapter(original).kind(original)
    with torch.inference_mode():
        torch.testing.assert_close(model_output(in_loop, x, kind), model_output(ranked, x, kind), rtol=1e-5, atol=1e-5)


def test_max_layers_over_the_candidates_skips_the_ranking_only_for_the_block_loop(monkeypatch):
    """Where the model has no block loop the ranking still runs (its fits are the ones applied),
    and without calibration data --max-layers is refused whatever K, as before the skip."""
    import hadaconv.convert as conv

    calls, collect = [], conv.collect_statistics
    monkeypatch.setattr(conv, "collect_statistics", lambda *a, **k: calls.append(1) or collect(*a, **k))
    ids = [{"input_ids": torch.randint(0, 100, (4, 32))} for _ in range(3)]
    cfg = ConvertConfig(block=4, **FAST, max_layers=99, progress=False, rotate=False)  # its statistics pass aside
    assert convert(make_tiny("llama"), config=cfg, inputs=ids).converted == [0, 1] and calls == []
    monkeypatch.setattr(conv, "_blockwise_decoder", lambda *a, **k: None)
    assert convert(make_tiny("llama"), config=cfg, inputs=ids).converted == [0, 1] and calls == [1]
    with pytest.raises(hadaconv.errors.HadaconvError, match="need calibration data"):
        convert(make_tiny("llama"), config=dataclasses.replace(cfg, calib="none"))


def test_a_ranking_on_few_held_out_windows_is_warned_about():
    """The ranking measures on held-out windows only; where fewer than four are held out it says
    so (in the report, and while it runs), not where enough are, nor without a ranking."""
    from tiny_models import tokenizer_folder
    from transformers import AutoTokenizer

    from hadaconv.report import ConvertReport, ranking_warning

    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    said = {}
    for samples, ranked in ((20, True), (40, True), (20, False)):
        cfg = ConvertConfig(block=4, seq_len=16, samples=samples, calib=["shakespeare"], progress=False,
                            max_layers=1 if ranked else None)
        report = convert(make_tiny("llama"), tok, cfg)
        said[samples, ranked] = [w for w in report.warnings() if "ranked" in w]
        assert (report.ranked_on, report.ranked_fitted) == {(20, True): (2, 0), (40, True): (4, 0)}.get(
            (samples, ranked), (0, 0))
    assert said[20, True] == ["the layers were ranked on 2 held-out windows: a noisy choice; samples=40 or more "
                              "holds out 4"]
    assert said[40, True] == said[20, False] == []
    assert ranking_warning(2, 0, 512, 30).endswith("; more calibration text holds out 4")  # the text was short
    report = ConvertReport(mode="head", block=4, adapter="llama", samples=32, windows=31, sampled=True, ranked_on=3,
                           heldout_tokens=3 * 16)
    assert report.warnings() == ["the layers were ranked on 3 held-out windows: a noisy choice; samples=40 or more "
                                 "holds out 4"]  # sampled text makes a few windows fewer: no shorter text to blame
    assert ranking_warning(4, 2, 40, 40).startswith("the layers were ranked on 2 held-out windows, and on 2 the fits")
    assert ranking_warning(4, 4, 8, 8) is None  # none held out: the calibration warning says so


def test_data_free_parameter_count_is_exact():
    model = make_tiny("llama")
    before = sum(p.numel() for p in model.parameters())
    report = convert(model, config=ConvertConfig(calib="none", block=8, sensitivity=False))
    d = 64
    assert report.params_before - report.params_after == 2 * (d * d - d * 8 - d)
    assert before - sum(p.numel() for p in model.parameters()) == 2 * (d * d - d * 8 - d)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hadaconv.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "hadaconv", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("Usage: hadaconv run [OPTIONS] BUNDLE"), out.stderr


def test_cli_convert_inspect_eval(tmp_path, capsys, monkeypatch):
    """inspect, convert --dry-run, convert, inspect of the result and eval, in the CLI.  inspect
    and the dry run read the config alone (no weights loaded); the converted folder is loaded."""
    import hadaconv.io
    from cli_runner import run_cli

    src = tmp_path / "tiny"
    make_tiny("llama", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    load_model = hadaconv.io.load_model

    def no_load(*args, **kwargs):
        raise AssertionError("inspect must read the config alone")

    def removed(stdout: str) -> int:
        return int(re.search(r"-([\d,]+) parameters", stdout).group(1).replace(",", ""))

    monkeypatch.setattr(hadaconv.io, "load_model", no_load)
    code, stdout, stderr = run_cli(capsys, "inspect", src, "--block", "4")
    assert code == 0 and "o_proj" in stdout and "weights not read" in " ".join(stdout.split()), stderr  # wrapped
    saved = removed(stdout)
    code, stdout, stderr = run_cli(capsys, "inspect", src, "--block", "4", "--rank", "2")
    assert code == 0 and "--rank 2" in stdout, stderr
    config = json.loads((src / "config.json").read_text())
    assert saved - removed(stdout) == config["num_hidden_layers"] * 2 * 2 * config["hidden_size"]
    code, stdout, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "never", "--dry-run", "--block", "4",
                                   "--layers", "0,1", "--seq-len", "32", "--max-layers", "1")  # 256 > the context
    assert code == 0 and "the run converts at most the 1 it ranks least sensitive (--max-layers): up to -" in \
        " ".join(stdout.split()), stdout
    code, stdout, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "never", "--dry-run", "--block", "4",
                                   "--layers", "1", "--seq-len", "32", "--max-layers", "1")
    assert code == 0 and not (tmp_path / "never").exists(), stderr
    assert "layers.1.self_attn.o_proj" in stdout and "layers.0.self_attn.o_proj" not in stdout
    layers = config["num_hidden_layers"]
    assert f"{layers} attention blocks, 1 of the {layers} dense ones candidates (--layers)" in " ".join(stdout.split())
    # What the real run would calibrate on, and that --max-layers would choose nothing.
    assert "calibration: 512 sequences of 32 tokens the model writes" in stdout
    assert "warning: --max-layers 1 is not fewer than the 1 candidate layer, so every one is converted" in stderr
    assert removed(stdout) * config["num_hidden_layers"] == saved  # one layer's share
    monkeypatch.setattr(hadaconv.io, "load_model", load_model)
    out = tmp_path / "conv"
    code, stdout, stderr = run_cli(capsys, "convert", src, "-o", out, "--block", "4", "--samples", "12",
                                   "--seq-len", "32", "--layers", "1", "--max-layers", "1")
    assert code == 0, stderr
    # Nothing for --max-layers to choose from: converted, and said (a newcomer's --layers 0-1 --max-layers 5).
    said = " ".join(stderr.split())  # before the conversion and in its report
    assert "windows asked" not in said  # sampled text, re-tokenized a few windows short, is no short text
    assert "warning: --max-layers 1 is not fewer than the 1 candidate layer, so every one is converted" in said
    assert "warning: --max-layers 1 is not fewer than the 1 candidate layer, so every one was converted" in said
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hadaconv"]["layers"] == [1] and cfg["hadaconv"]["block"] == 4
    assert json.loads((out / "report.json").read_text())["converted"] == [1]
    code, stdout, stderr = run_cli(capsys, "inspect", out)  # the converted layer is counted, not listed again
    layers = config["num_hidden_layers"]
    assert code == 0 and f"{layers} attention blocks (1 converted already" in " ".join(stdout.split()), stderr
    # ... and the conversion's own report follows, read back from report.json (the table, its caption).
    said = " ".join(stdout.split())
    assert f"the conversion's report ({out / 'report.json'}):" in said and "converted 1 of 1 candidate layers" in said
    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "layers": [{"index": "x"}]}))  # edited by hand
    code, stdout, stderr = run_cli(capsys, "inspect", out)
    assert code == 0 and "no conversion report to show (not a conversion report (TypeError" in stderr, stderr
    run = {"steps": 3, "tokens": 3072, "metric": "perplexity", "before": 40.0, "after": 30.0, "eval_loss": "KL",
           "loss_before": 0.5, "loss_after": 0.25}
    (out / "report.json").write_text(json.dumps({**report, "distill": run}))
    code, stdout, stderr = run_cli(capsys, "inspect", out)
    assert "distilled: 3 steps, 3,072 tokens; perplexity 40 -> 30, KL 0.5 -> 0.25" in " ".join(stdout.split()), stdout
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    code, stdout, stderr = run_cli(capsys, "eval", out, "--text", text, "--seq-len", "32", "--max-windows", "4")
    assert code == 0 and "perplexity" in stdout, stderr
    # JSON Lines (hadaconv sample's output) are scored on their texts joined by blank lines, not on the JSON.
    records = ["To be, or not to be, that is the question. " * 100, "Whether 'tis nobler in the mind to suffer. " * 100]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    (tmp_path / "joined.txt").write_text("\n\n".join(records))
    scores = []
    for file in (tmp_path / "t.jsonl", tmp_path / "joined.txt"):
        code, stdout, stderr = run_cli(capsys, "eval", out, "--text", file, "--seq-len", "32", "--max-windows", "4",
                                       "--no-baseline")
        assert code == 0, stderr
        scores.append(re.findall(r"perplexity ([0-9.]+)", stdout))
    assert scores[0] == scores[1] and scores[0]
    code, stdout, stderr = run_cli(capsys, "convert", src, "-o", out)  # exists already
    assert code != 0


def test_a_target_that_replaces_a_family_adapter_is_warned(tmp_path, capsys):
    """--target on a model an adapter knows converts with the generic adapter's affine fit and no
    value map: the plan and the run say so (a newcomer's --target o_proj lost the head fit without
    a word); a model only --target can convert is not warned about."""
    from cli_runner import run_cli

    from hadaconv.adapters import target_overrides

    make_tiny("llama", tmp_path / "src")
    warned = ("warning: --target o_proj replaces the llama adapter, which knows this model: the layers it matches "
              "are converted as output projections with the affine fit")
    for dry, times in ((["--dry-run"], 1), ([], 2)):  # a run says it at once, and again with the report's
        code, _, err = run_cli(capsys, "convert", tmp_path / "src", "-o", tmp_path / "out", "--target", "o_proj",
                               "--calib", "shakespeare", "--samples", "12", "--seq-len", "32", "--no-sensitivity",
                               *dry)
        assert code == 0 and " ".join(err.split()).count(warned) == times, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["target_overrides"].startswith(warned[9:30])
    affine = target_overrides(make_tiny("llama"), "o_proj", mode="affine")  # that fit folds no value map either
    assert "affine fit;" in affine and "value map" not in affine
    assert target_overrides(torch.nn.Sequential(torch.nn.Linear(4, 4)), "0") is None
    assert target_overrides(make_tiny("llama"), None) is None


def test_cli_eval_of_a_converted_encoder_compares_with_its_original(tmp_path, capsys):
    """An encoder has no perplexity: eval of a converted encoder compares its embeddings with the
    original it recorded, as eval of a converted LM compares perplexities (a newcomer's
    ``eval mini-hc`` failed with an AttributeError); --reference still names another model."""
    from cli_runner import run_cli

    src, out = tmp_path / "bert", tmp_path / "conv"
    make_tiny("bert", src)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    code, _, stderr = run_cli(capsys, "convert", src, "-o", out, "--calib", text, "--samples", "12", "--seq-len", "16",
                              "--layers", "0")
    assert code == 0, stderr
    for extra, reference in (([], src), (["--reference", out], out)):
        code, stdout, stderr = run_cli(capsys, "eval", out, "--text", text, "--seq-len", "16", "--max-windows", "2",
                                       *extra)
        cosine = re.search(rf"embedding cosine to {re.escape(str(reference))}: ([\d.]+)", stdout)
        assert code == 0 and cosine, stderr
        assert 0.5 < float(cosine.group(1)) <= 1 + 1e-6
    assert float(cosine.group(1)) > 1 - 1e-6  # against itself


def test_cli_eval_gives_its_config_to_the_model_of_bare_weights(tmp_path, capsys, monkeypatch):
    """A conversion of bare weights records the original and its config as absolute paths, so
    that eval finds its baseline from any working folder without --config; eval's one --config
    serves whichever of its models holds bare weights (the baseline here, recorded or named by
    --baseline), not the converted folder, which carries its own config."""
    from cli_runner import run_cli

    make_tiny("llama", tmp_path / "tiny")
    bare, text = tmp_path / "tiny" / "model.safetensors", tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(capsys, "convert", "tiny/model.safetensors", "-o", "conv", "--config", "tiny",
                              "--block", "4", "--samples", "8", "--seq-len", "16", "--layers", "0", "--calib", text,
                              "--no-sensitivity")
    assert code == 0, stderr
    out = tmp_path / "conv"
    meta = json.loads((out / "config.json").read_text())["hadaconv"]
    assert meta["source"] == str(bare) and meta["source_config"] == str(tmp_path / "tiny" / "config.json")
    monkeypatch.chdir(_mkdir_p(tmp_path / "elsewhere"))
    # --baseline naming the recorded original itself takes its recorded config too.
    for extra in ([], ["--config", tmp_path / "tiny"], ["--baseline", bare, "--config", tmp_path / "tiny"],
                  ["--baseline", bare]):
        code, stdout, stderr = run_cli(capsys, "eval", out, "--text", text, "--seq-len", "16", "--max-windows", "2",
                                       *extra)
        assert code == 0 and f"baseline {bare.parent.name}/{bare.name}: perplexity" in stdout, stderr
        assert f"now {bare} on the same windows" in stderr  # the whole path once, on the progress stream
    (tmp_path / "tiny" / "config.json").rename(tmp_path / "moved.json")  # the recorded config gone: said so
    for verb in (["eval", out, "--text", text], ["distill", out, "-o", tmp_path / "d", "--max-steps", "1"]):
        code, _, stderr = run_cli(capsys, *verb)
        assert code != 0 and re.search(r"^error: the original's config .*tiny/config\.json, recorded at conversion, "
                                       r"is gone: give it with --config$", stderr, re.M), stderr
    (tmp_path / "moved.json").rename(tmp_path / "tiny" / "config.json")
    # distill --teacher naming the recorded original takes its recorded config too.
    code, _, stderr = run_cli(capsys, "distill", out, "-o", tmp_path / "d", "--teacher", bare, "--data", text,
                              "--max-steps", "1", "--samples", "10", "--seq-len", "16", "--eval-windows", "1")
    assert code == 0, stderr
    bare.rename(tmp_path / "moved.safetensors")  # the recorded original gone: the note, not a refusal
    code, stdout, stderr = run_cli(capsys, "eval", out, "--config", tmp_path / "tiny", "--text", text, "--seq-len",
                                   "16", "--max-windows", "2")
    assert code == 0 and "perplexity" in stdout and "note: no baseline" in stderr, stderr
    (tmp_path / "tiny" / "config.json").unlink()  # the whole original gone, config too: still the note
    code, stdout, stderr = run_cli(capsys, "eval", out, "--text", text, "--seq-len", "16", "--max-windows", "2")
    assert code == 0 and "perplexity" in stdout and "note: no baseline" in stderr, stderr


def test_the_recorded_original_keeps_its_link_name(tmp_path):
    """A hub cache's snapshot files are links to blobs without a suffix: the record keeps the
    link's own (absolute) path, whose suffix says how to load it."""
    from hadaconv.convert import _original

    (tmp_path / "blob").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    link = tmp_path / "model.safetensors"
    link.symlink_to(tmp_path / "blob")
    record = _original(str(link), {}, str(tmp_path))
    assert record == {"source": str(link), "source_config": str(tmp_path / "config.json")}


def _mkdir_p(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_inspect_loads_the_weights_for_an_adapter_that_reads_them(tmp_path, capsys, monkeypatch):
    import hadaconv.adapters
    from cli_runner import run_cli

    make_tiny("llama", tmp_path / "tiny")
    find = hadaconv.adapters.find_adapter

    def reads_values(model, **kwargs):
        next(model.parameters()).tolist()  # NotImplementedError on the meta device
        return find(model, **kwargs)

    monkeypatch.setattr(hadaconv.adapters, "find_adapter", reads_values)
    code, stdout, stderr = run_cli(capsys, "inspect", tmp_path / "tiny")
    assert code == 0 and "Hugging Face folder" in " ".join(stdout.split()) and "o_proj" in stdout, stderr


def test_cli_bad_input_is_one_line(tmp_path):
    """The installed entry point, in a process of its own, turns a loader's error into one line
    and writes nothing (tests/test_bad_inputs.py checks every other bad input in-process)."""
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    r = _cli("convert", src, "-o", tmp_path / "out")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_replay_matches_full_forward(family, monkeypatch):
    """Replaying the unchanged blocks' outputs gives the sensitivities of full forward passes."""
    import hadaconv.sensitivity as sens
    from hadaconv.calibrate import Moments
    from hadaconv.fit import fit_projection

    model = make_tiny(family)
    model.eval()
    adapter = find_adapter(model)
    adapter.prepare(model)
    layers = adapter.layers(model)
    assert block_list(model, layers) is not None
    fits = {}
    for layer in layers:
        w, b = layer.out.get()
        torch.manual_seed(layer.index)
        fits[layer.index] = fit_projection(w, b, Moments.identity(layer.width), mode="affine", block=1)
    probe = [example_inputs(family, model, seed=7)]
    kind = adapter.kind(model)
    replayed = sens.sensitivities(model, layers, fits, probe, kind, False)
    monkeypatch.setattr(sens, "block_list", lambda model, layers: None)
    full = sens.sensitivities(model, layers, fits, probe, kind, False)
    assert all(v > 0 for v in full)
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(full), rtol=1e-5, atol=1e-9)
    monkeypatch.undo()
    assert all("forward" not in vars(blk) for blk in block_list(model, layers)[1])


def test_sensitivity_does_not_depend_on_how_the_probe_is_batched():
    """The probe split into batches of 4 and 2 windows gives the KL per token of the 6 windows in
    one batch: each batch weighs by its positions (an unweighted mean would count the short
    batch's tokens twice as much)."""
    import hadaconv.sensitivity as sens
    from hadaconv.calibrate import Moments
    from hadaconv.fit import fit_projection

    model = make_tiny("llama").eval()
    adapter = find_adapter(model)
    adapter.prepare(model)
    layers = adapter.layers(model)
    fits = {layer.index: fit_projection(*layer.out.get(), Moments.identity(layer.width), mode="affine", block=1)
            for layer in layers}
    ids = torch.randint(0, model.config.vocab_size, (6, 12), generator=torch.Generator().manual_seed(3))
    whole = sens.sensitivities(model, layers, fits, [{"input_ids": ids}], "causal-lm", False)
    split = sens.sensitivities(model, layers, fits, [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}], "causal-lm",
                               False)
    torch.testing.assert_close(torch.tensor(split, dtype=torch.float64), torch.tensor(whole, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_default_block_divides_every_width_into_at_least_eight_blocks():
    from hadaconv.convert import default_block

    assert [default_block([w]) for w in (576, 896, 4096, 384, 64, 48)] == [64, 64, 64, 32, 8, 4]
    assert default_block([576, 640]) == 64 and default_block([576, 96]) == 8  # every layer's width
    assert default_block([7]) == 1


def test_config_checks_take_what_python_callers_pass():
    """numpy integers and floats, a range of layers and a torch dtype are what a script passes;
    the up-front checks must not refuse them (the CLI's types never produce them)."""
    import pathlib

    import numpy as np

    from hadaconv.convert import ConvertConfig, check_config
    from hadaconv.distill import DistillConfig
    from hadaconv.distill.core import check_config as check_distill

    cfg = check_config(ConvertConfig(layers=range(0, 6, 2), samples=np.int64(16), max_loss=np.float32(0.5)))
    assert cfg.layers == [0, 2, 4]
    cfg = check_config(ConvertConfig(layers=np.arange(3)))
    assert cfg.layers == [0, 1, 2] and all(type(i) is int for i in cfg.layers)
    d = DistillConfig(samples=np.int64(100), lr=np.float32(1e-4), dtype=torch.bfloat16, stages=("local", "global"))
    assert check_distill(d) is d
    assert check_distill(DistillConfig(dtype=None, max_time=90)).max_time == 90
    assert check_distill(DistillConfig(data="sample")).data == ["sample"]  # one source, not six
    assert check_distill(DistillConfig(data=pathlib.Path("t.txt"))).data == [pathlib.Path("t.txt")]
    from hadaconv.errors import check_number

    for temperature in (np.array(0.7), torch.tensor(0.7), np.float32(0.7)):  # generate's numbers
        check_number("temperature", temperature, 0)


def test_cli_convert_says_when_the_text_makes_fewer_windows_than_asked(tmp_path, capsys):
    """Short calibration text is said at once (before the fits) and again after the report."""
    from cli_runner import run_cli

    src = tmp_path / "tiny"
    make_tiny("llama", src)
    text = tmp_path / "short.txt"
    text.write_text("The river runs past the mill and under the old stone bridge. " * 8)
    code, stdout, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "out", "--calib", text, "--samples", "32",
                                   "--seq-len", "16", "--layers", "1", "--block", "4")
    assert code == 0, stderr
    said = " ".join(stderr.split())
    made = re.search(r"warning: the calibration text made (\d+) of the 32 windows asked \(--samples\)", said)
    assert made and 2 <= int(made.group(1)) < 10 and said.count(made.group(0)) == 2, said
    assert "no calibration window is held out" in said
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["windows"] == int(made.group(1)) and report["samples"] == 32 and not report["sampled"]


def test_a_short_calibration_file_is_named_before_and_after_the_load(tmp_path):
    """The early count (the tokenizer alone) and the run's own (convert() in memory, which has no
    early check) refuse a short file with one message naming it, alone or beside other text."""
    from hadaconv.convert import check_against_model
    from hadaconv.errors import HadaconvError
    from hadaconv.io import load_model

    src = tmp_path / "tiny"
    make_tiny("llama", src)
    short = tmp_path / "short.txt"
    short.write_text("A short note.")
    long = tmp_path / "long.txt"
    long.write_text("The river runs past the mill and under the old stone bridge. " * 200)
    loaded = load_model(src)
    for calib in ([str(short)], [str(long), str(short)]):
        cfg = ConvertConfig(calib=calib, samples=8, seq_len=16, block=4, sensitivity=False)
        expect = rf"the calibration text {re.escape(str(short))} has \d+ tokens, too few for two windows of 16"
        with pytest.raises(HadaconvError, match=expect):
            check_against_model(str(src), cfg)
        with pytest.raises(HadaconvError, match=expect):
            convert(loaded.model, loaded.tokenizer, cfg)
    check_against_model(str(src), ConvertConfig(calib=[str(long)], samples=8, seq_len=16, block=4))
    # A file too large to be short is not read twice: no tokenizer is even built for it.
    import hadaconv.io

    def no_tokenizer(*args, **kwargs):
        pytest.fail("the early count read a file too large to be short")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hadaconv.io, "source_tokenizer", no_tokenizer)
        check_against_model(str(src), ConvertConfig(calib=[str(long)], samples=8, seq_len=8, block=4))


def test_cli_says_why_a_converted_gguf_is_larger(tmp_path, capsys):
    """A GGUF's quantized weights are read as float32: convert says why the folder is several
    times the file, and how to halve it; not for other inputs, nor when --dtype was given."""
    from hadaconv.cli import _note_dequantized

    gguf, folder = tmp_path / "m.gguf", tmp_path / "out"
    gguf.write_bytes(b"x" * 1000)
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 5000)
    for source, dtype, said in ((gguf, "auto", True), (gguf, "bfloat16", False), (tmp_path / "m.safetensors", "auto",
                                                                                  False)):
        _note_dequantized(str(source), str(folder), dtype)
        err = capsys.readouterr().err
        assert ("--dtype bfloat16 halves it" in err) == said, err


def test_an_asked_compensation_the_adapter_cannot_do_is_said(tmp_path, capsys):
    """--compensate is on by default and does nothing for adapters without dense maps into the
    residual stream (BERT's): silent by default, a note when the user asked for it by name."""
    from cli_runner import run_cli

    src = tmp_path / "bert"
    make_tiny("bert", src)
    run = ["--block", "4", "--calib", "shakespeare", "--samples", "8", "--seq-len", "16", "--no-sensitivity"]
    code, _, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "a", *run)
    assert code == 0 and "--compensate" not in stderr, stderr
    code, _, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "b", *run, "--compensate")
    assert code == 0, stderr
    assert "note: --compensate did nothing: the bert adapter names no dense maps" in " ".join(stderr.split())


def test_a_data_free_fit_asked_to_compensate_says_why_not(tmp_path, capsys):
    """The note names the reason: a Llama's adapter has dense maps to refit, a data-free fit has
    nothing to refit them to (a review found the note blaming the adapter)."""
    from cli_runner import run_cli

    src = tmp_path / "tiny"
    make_tiny("llama", src)
    code, _, stderr = run_cli(capsys, "convert", src, "-o", tmp_path / "a", "--block", "4", "--calib", "none",
                              "--compensate")
    said = " ".join(stderr.split())
    assert code == 0 and "note: --compensate did nothing: a data-free fit has no original block outputs" in said, said


def test_a_half_precision_model_is_fitted_in_float32_and_saved_in_its_own_dtype(tmp_path):
    """On the CPU, device.upcast_on_cpu runs a bfloat16 model in float32 and returns the dtype to
    restore: convert_file saves the bfloat16 it was given, fitted layers included."""
    from safetensors import safe_open

    from hadaconv.device import upcast_on_cpu

    model = torch.nn.Linear(4, 4).bfloat16()
    assert upcast_on_cpu(model) == torch.bfloat16 and model.weight.dtype == torch.float32
    assert upcast_on_cpu(model) is None and upcast_on_cpu(torch.nn.ReLU()) is None  # float32, or no weights
    marked = make_tiny("llama").bfloat16()
    marked.is_quantized = True  # as transformers marks a model it loaded from GGUF: its .float() raises
    assert upcast_on_cpu(marked) == torch.bfloat16 and marked.lm_head.weight.dtype == torch.float32
    rotary = torch.nn.Linear(4, 4).bfloat16()  # a complex rotary table, as Meta's reference Llama keeps one
    rotary.register_buffer("freqs_cis", torch.polar(torch.ones(3), torch.arange(3.0)))
    assert upcast_on_cpu(rotary) == torch.bfloat16
    assert rotary.weight.dtype == torch.float32 and rotary.freqs_cis.dtype == torch.complex64
    assert rotary.freqs_cis.imag.abs().sum() > 0  # .to(float32) would have dropped it
    make_tiny("llama", tmp_path / "src")
    hadaconv.convert_file(str(tmp_path / "src"), str(tmp_path / "out"),
                          ConvertConfig(layers=[0], sensitivity=False, **FAST), dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
