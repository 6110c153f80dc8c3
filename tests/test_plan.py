"""inspect_model and plan_conversion: the Python side of ``hadaconv inspect`` and ``convert
--dry-run``, read from the config alone where the model has one."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from cli_runner import run_cli
from tiny_models import make_tiny

import hadaconv
from hadaconv import ConvertConfig
from hadaconv.errors import HadaconvError, InputError
from hadaconv.nn import parameters_saved


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny Llama folder; loading its weights fails the test (the plan reads the config)."""
    import hadaconv.io

    src = tmp_path / "tiny"
    model = make_tiny("llama", src)

    def no_load(*args, **kwargs):
        pytest.fail("the plan loaded the weights of a model whose config gives the shapes")

    monkeypatch.setattr(hadaconv.io, "load_model", no_load)
    return src, model


def test_inspect_lists_every_layer_and_prices_it_from_the_config(tiny):
    src, model = tiny
    config = json.loads((src / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    plan = hadaconv.inspect_model(src, block=4, rank=2)
    assert plan.from_config and plan.kind == "causal-lm" and plan.converted == 0 and plan.blocks == layers
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    assert [layer.index for layer in plan.layers] == list(range(layers))
    bias = model.model.layers[0].self_attn.o_proj.bias is not None
    assert plan.removable == layers * parameters_saved(d, d, 4, bias, 2) > 0
    assert plan.calibration is None and plan.warnings == []
    assert plan.to_dict()["removable"] == plan.removable


def test_plan_conversion_takes_the_candidates_and_says_what_the_run_would(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "cache"))  # no sampled text of any model
    plan = hadaconv.plan_conversion(src, ConvertConfig(layers=[1], block=4, max_layers=3, seq_len=32, samples=64))
    assert [layer.index for layer in plan.layers] == [1] and plan.block == 4
    assert plan.blocks > 1 and plan.removed_at_most == plan.removable  # one candidate, max_layers 3: all of it
    two = hadaconv.plan_conversion(src, ConvertConfig(layers=[0, 1], block=4, max_layers=1, seq_len=32))
    assert two.removed_at_most == two.removable // 2 > 0 and two.warnings == []
    assert plan.calibration.startswith("64 sequences of 32 tokens the model writes")
    assert len(plan.warnings) == 1
    assert plan.warnings[0].startswith("max_layers 3 is not fewer than the 1 candidate layer, so every one is converted")
    assert hadaconv.plan_conversion(src, ConvertConfig(calib="none", block=4)).calibration == "none (a data-free fit)"
    # With --max-loss the ranking still chooses (convert converts what stays under it): no warning.
    assert hadaconv.plan_conversion(src, ConvertConfig(layers=[1], block=4, max_layers=3, max_loss=1e-9,
                                                       seq_len=32)).warnings == []
    streamed = hadaconv.plan_conversion(src, ConvertConfig(block=4, seq_len=32), streamed=True)
    assert "(none of them cached: a streamed run reads the cache alone and would stop" in streamed.calibration


def test_plan_conversion_checks_the_output_as_the_run_would(tiny, tmp_path):
    from hadaconv.errors import OutputError

    output = tmp_path / "out.txt"  # a missing model and a file as the output: swapped, as convert_file says
    output.write_text("x")
    with pytest.raises(InputError, match="are the two swapped"):
        hadaconv.plan_conversion(tmp_path / "nope", ConvertConfig(), output=output)

    src, _ = tiny
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    cfg = ConvertConfig(block=4, seq_len=32)
    with pytest.raises(OutputError, match="already exists and is not empty"):
        hadaconv.plan_conversion(src, cfg, output=taken)
    with pytest.raises(OutputError, match="holds files hadaconv did not write"):
        hadaconv.plan_conversion(src, cfg, output=taken, overwrite=True)
    (taken / "x").unlink()
    (taken / "config.json").write_text('{"hadaconv": {"layers": []}}')  # now a converted folder
    assert hadaconv.plan_conversion(src, cfg, output=taken, overwrite=True).layers
    with pytest.raises(OutputError):
        hadaconv.plan_conversion(src, cfg, output=src, overwrite=True)  # the input itself


@pytest.mark.parametrize("cfg, error, kind", [
    (ConvertConfig(layers=[0, 99], block=4), r"names 99", HadaconvError),
    (ConvertConfig(block=5), r"does not divide", InputError),
    (ConvertConfig(seq_len=10 ** 6), r"longer than the model's context", HadaconvError),
    (ConvertConfig(calib=["nope.txt"]), r"calibration source not found: nope\.txt", HadaconvError),
])
def test_plan_conversion_refuses_what_the_run_would_before_its_load(tiny, cfg, error, kind):
    src, _ = tiny
    with pytest.raises(kind, match=error):
        hadaconv.plan_conversion(src, cfg)


def test_a_converted_folder_is_planned_from_its_weights(tmp_path, capsys):
    """A converted folder's structure is only known from its weights: loaded, its converted
    layers counted and not listed again."""
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    out = tmp_path / "conv"
    hadaconv.convert_file(str(src), str(out), ConvertConfig(layers=[0], block=4, calib="none"))
    plan = hadaconv.inspect_model(out, block=4)
    assert not plan.from_config and plan.converted == 1
    assert 0 not in [layer.index for layer in plan.layers] and plan.layers
    # Wholly converted: listed with nothing left (a newcomer's inspect of one was an error), not convertible.
    hadaconv.convert_file(str(out), str(tmp_path / "all"), ConvertConfig(block=4, calib="none"))
    plan = hadaconv.inspect_model(tmp_path / "all")
    assert plan.converted == plan.blocks == 2 and plan.layers == [] and plan.removable == 0
    with pytest.raises(HadaconvError, match="every attention output projection is converted already"):
        hadaconv.plan_conversion(tmp_path / "all")
    code, stdout, _ = run_cli(capsys, "inspect", tmp_path / "all")
    said = " ".join(stdout.split())
    assert code == 0 and "2 attention blocks, all converted already" in said and "nothing left to convert" in said


def test_a_dry_run_after_a_conversion_says_the_sampled_text_is_cached(tmp_path, monkeypatch):
    """convert_file records which files its sampled text came from; the dry run of the same model
    then says the text is cached, and of a model whose weights changed, that it is not known (while
    the cache holds no text at all, that it will be sampled)."""
    import hadaconv

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    cfg = ConvertConfig(block=4, seq_len=16, samples=4, layers=[0], sensitivity=False, progress=False)
    assert "(sampled on this run, then cached;" in hadaconv.plan_conversion(src, cfg).calibration
    hadaconv.convert_file(src, tmp_path / "out", cfg)
    assert "(all cached, sampled by an earlier run;" in hadaconv.plan_conversion(src, cfg).calibration
    # 8 sequences are one chunk of 8, other text than the 4 (a count's text never depends on the cache's history)
    assert "(sampled on this run, then cached;" in hadaconv.plan_conversion(src, replace(cfg, samples=8)).calibration
    unknown = "cached if this model's text was sampled before"
    assert unknown in hadaconv.plan_conversion(src, cfg, dtype="bfloat16").calibration
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())  # written again
    assert "cached if this model's text was sampled before" in hadaconv.plan_conversion(src, cfg).calibration


def test_a_dry_run_warns_of_a_text_that_makes_fewer_windows(tiny, tmp_path):
    """The dry run counts the windows a text file makes, as the run does, and warns as the run
    would (a newcomer's README made 84 of 2000 windows, said only after the load)."""
    src, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)  # about 600 tokens: 37 windows of 16
    cfg = ConvertConfig(block=4, seq_len=16, calib=[str(text)])
    warned = hadaconv.plan_conversion(src, replace(cfg, samples=200)).warnings
    expected = (r"the calibration text made \d+ of the 200 windows asked \(samples\): give more text, or ask for "
                r"fewer windows or a smaller seq_len")
    assert len(warned) == 1 and re.fullmatch(expected, warned[0]), warned
    assert hadaconv.plan_conversion(src, replace(cfg, samples=20)).warnings == []
    assert hadaconv.plan_conversion(src, replace(cfg, samples=200, calib=None)).warnings == []  # sampled: the run's
    ranked = hadaconv.plan_conversion(src, replace(cfg, samples=32, calib=None, max_layers=1)).warnings
    assert ranked == ["the layers were ranked on 3 held-out windows: a noisy choice; samples=40 or more holds out 4"]
