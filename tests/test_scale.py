"""Conversion at scale: statistics shared across processes, devices and dtypes, empty-model loading."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hadaconv.convert import ConvertConfig, chooses_nothing, convert, convert_file
from tiny_models import make_tiny, tokenizer_folder

# Independent fits on the plays (the statistics stage alone, whose sums the 2-rank test shares).
FAST = dict(samples=16, seq_len=32, batch_size=2, max_iter=10, block=4, sensitivity=False, progress=False,
            calib=["shakespeare"], sequential=False, compensate=False)


def _fits(model) -> dict[str, torch.Tensor]:
    """Every converted projection's gamma and beta and the (folded) value weights, float64."""
    return {k: v.detach().double().clone() for k, v in model.state_dict().items()
            if k.endswith((".gamma", ".beta", "v_proj.weight"))}


def _convert_tiny() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    model = make_tiny("llama")
    # rotate=False: the rotation's 41 rounds of iterative fits carry the last bits in which the
    # all-reduced sums differ from one process's into the weights (4.6e-6 relative), past this bound.
    convert(model, AutoTokenizer.from_pretrained(tokenizer_folder()), ConvertConfig(**FAST, rotate=False))
    return _fits(model)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fits = _convert_tiny()
        if rank == 0:
            torch.save(fits, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_fits_of_one_process(tmp_path):
    """2 CPU ranks (gloo) each see half the calibration windows; the all-reduced float64 moments
    give the same fits as one process seeing all of them, within 1e-10 relative."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fits.pt"
    mp.spawn(_rank, args=(2, port, str(out)), nprocs=2, join=True)
    shared = torch.load(out)
    alone = _convert_tiny()
    assert shared.keys() == alone.keys() and any(k.endswith(".gamma") for k in alone)
    for k in alone:
        rel = (shared[k] - alone[k]).norm() / alone[k].norm()
        assert rel < 1e-10, (k, rel.item())


def test_bfloat16_checkpoint_stays_bfloat16_and_loads_without_random_init(tmp_path, monkeypatch):
    """A bfloat16 checkpoint converts in bfloat16 (dtype auto), is saved in bfloat16 and not larger
    than its input, and reloads; the model is never randomly initialised on the way."""
    src = tmp_path / "src"
    model = make_tiny("llama").to(torch.bfloat16)
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_folder() / name).is_file():
            (src / name).write_bytes((tokenizer_folder() / name).read_bytes())

    def guard(init):
        def no_init(tensor, *args, **kwargs):
            # Initialisers may run on meta tensors (no memory, no values); never on real ones.
            assert tensor.is_meta, "a weight was randomly initialised"
            return init(tensor, *args, **kwargs)
        return no_init

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, guard(getattr(torch.nn.init, name)))
    report = convert_file(str(src), str(tmp_path / "out"), ConvertConfig(**FAST), device="cpu", dtype="auto")
    assert report.converted
    import hadaconv

    reloaded = hadaconv.load(tmp_path / "out")
    dtypes = {p.dtype for p in reloaded.parameters()}
    assert dtypes == {torch.bfloat16}
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "out") <= size(src)
    with torch.inference_mode():
        logits = reloaded(input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch here)")
def test_cuda_convert_matches_cpu(tmp_path):
    """The model, batches, statistics and fits on the GPU give the CPU's fits (float32 model;
    the float64 statistics differ only in summation order)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    cpu_model = make_tiny("llama")
    convert(cpu_model, tok, ConvertConfig(**FAST))
    gpu_model = make_tiny("llama").to("cuda")
    report = convert(gpu_model, tok, ConvertConfig(**FAST))
    assert report.converted
    cpu_fits, gpu_fits = _fits(cpu_model), _fits(gpu_model.cpu())
    for k in cpu_fits:
        assert torch.allclose(cpu_fits[k], gpu_fits[k], rtol=1e-3, atol=1e-4), k


def _tiny_folder(path, dtype=torch.float32, shard="60KB", tied=True):
    model = make_tiny("llama")
    if not tied:  # a head of its own, as Llama-3-8B has
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5 + 0.01)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_folder() / name).is_file():
            (path / name).write_bytes((tokenizer_folder() / name).read_bytes())
    return path


# convert's defaults (text sampled from the model, sequential fits, compensation) at test size.
# rotate=False: a streamed run cannot rotate the residual stream, and the in-memory one would
DEFAULTS = dict(samples=16, seq_len=32, batch_size=2, max_iter=10, block=4, sensitivity=False, progress=False,
                rotate=False)


def _state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("options", [{}, {"sequential": False, "compensate": False, "calib": ["shakespeare"]},
                                     {"max_layers": 1}, {"max_loss": 0.003, "sequential": False},
                                     {"max_layers": 1, "tied": False}, {"max_layers": 5, "sensitivity": True},
                                     {"layers": [0], "max_loss": 1.0}],
                         ids=["defaults", "independent", "max-layers", "max-loss", "max-layers-untied",
                              "max-layers-of-all", "max-loss-of-layer-0"])
def test_streamed_conversion_matches_the_whole_model_one(tmp_path, options):
    """Block by block from the shards (one block in memory) is convert's own block loop: with
    the same options and text it writes the weights the in-memory conversion writes (to 1e-6
    relative per tensor: the same float32 operations on the same inputs, which in practice give
    identical bits), one shard per block, and reloads into the same model.  With the defaults
    the streamed run finds the text the in-memory one sampled in the cache.  Ranked, its pass
    over the shards measures the sensitivities the whole model's probe does and chooses the same
    layers."""
    import hadaconv
    from hadaconv.stream import convert_streamed

    options = dict(options)
    src = _tiny_folder(tmp_path / "src", tied=options.pop("tied", True))
    assert len(list(src.glob("*.safetensors"))) > 1
    cfg = ConvertConfig(**{**DEFAULTS, **options})
    whole = convert_file(str(src), str(tmp_path / "whole"), cfg)
    streamed = convert_streamed(src, tmp_path / "streamed", cfg)
    # Five of two layers chooses nothing: warned about, and streamed, not ranked.
    ranks = cfg.ranked and not chooses_nothing(cfg, 2)
    assert streamed.converted == whole.converted
    assert len(whole.converted) == (1 if ranks or cfg.layers else 2)
    assert streamed.warnings() == whole.warnings()
    assert streamed.calibration_source == whole.calibration_source
    assert (streamed.params_before, streamed.params_after) == (whole.params_before, whole.params_after)
    assert (streamed.sequential, streamed.compensate) == (whole.sequential, whole.compensate) == \
        (cfg.sequential, cfg.compensate)
    for a, b in zip(whole.layers, streamed.layers):
        for field in ("calib_error", "heldout_error", "block_error_before", "block_error_after"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None) and (x is None or y == pytest.approx(x, rel=1e-6)), field
        assert b.compensation_ridge == a.compensation_ridge
        if ranks:
            assert b.sensitivity == pytest.approx(a.sensitivity, rel=1e-6) and a.sensitivity > 0
        else:
            assert b.sensitivity is None
    assert streamed.sensitivity_metric == (whole.sensitivity_metric if ranks else "")
    one, other = _state(tmp_path / "whole"), _state(tmp_path / "streamed")
    assert one.keys() == other.keys()
    for k in one:
        rel = (one[k].double() - other[k].double()).norm() / max(one[k].double().norm(), 1e-30)
        assert rel <= 1e-6, (k, rel.item())
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > len(whole.layers)
    recorded = [json.loads((tmp_path / f / "config.json").read_text())["hadaconv"] for f in ("whole", "streamed")]
    for key in ("adapter", "layers", "block", "fit", "width", "m", "rank"):  # the same record of the same model
        assert recorded[0][key] == recorded[1][key], key
    m1, m2 = hadaconv.load(tmp_path / "whole"), hadaconv.load(tmp_path / "streamed")
    ids = torch.arange(12)[None]
    with torch.inference_mode():
        torch.testing.assert_close(m2(input_ids=ids).logits, m1(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_streamed_needs_sampled_text_in_the_cache(tmp_path):
    """Sampling runs the whole model per token: a streamed conversion only reads sampled text
    from the cache and says how to get it when it is not there."""
    from hadaconv.errors import HadaconvError
    from hadaconv.stream import convert_streamed

    src = _tiny_folder(tmp_path / "src")
    with pytest.raises(HadaconvError, match="without streaming"):
        convert_streamed(src, tmp_path / "out", ConvertConfig(**{**DEFAULTS, "samples": 13}))
    assert not (tmp_path / "out").exists()


def test_streamed_bfloat16_stays_bfloat16_and_not_larger(tmp_path):
    import hadaconv
    from hadaconv.stream import convert_streamed

    src = _tiny_folder(tmp_path / "src", torch.bfloat16, shard="30KB")
    report = convert_streamed(src, tmp_path / "out", ConvertConfig(**FAST))
    assert report.converted and report.bytes_after <= report.bytes_before
    model = hadaconv.load(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "out") <= size(src)
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=torch.arange(8)[None]).logits.float()).all()


def test_cli_streamed_ranked_and_device_errors(tmp_path, capsys):
    from cli_runner import run_cli

    src = _tiny_folder(tmp_path / "src")
    code, out, err = run_cli(capsys, "convert", src, "-o", tmp_path / "out", "--streamed", "--samples", 12,
                             "--seq-len", 32, "--block", 4, "--device", "cpu", "--calib", "shakespeare")
    assert code == 0, err
    assert "fit s" in out and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ranked = ("--streamed", "--samples", 12, "--seq-len", 32, "--block", 4, "--calib", "shakespeare",
              "--max-layers", 1)
    code, out, err = run_cli(capsys, "convert", src, "-o", tmp_path / "o2", *ranked, "--dry-run")
    assert code == 0 and "up to -3,776 parameters" in " ".join(out.split()), out + err  # the caption wraps
    code, out, err = run_cli(capsys, "convert", src, "-o", tmp_path / "o2", *ranked)
    assert code == 0, err
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["converted"] in ([0], [1])
    assert "KL" in out  # the sensitivity column of the report
    code, _, err = run_cli(capsys, "eval", src, "--device", "tpu")
    assert code != 0 and "--device tpu" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "eval", src, "--device", "cuda")
        assert code != 0 and "CUDA is not available" in err


def test_streamed_counts_a_tied_parameter_once_and_no_buffers():
    """A checkpoint of a tied model may store the embedding under both names; convert_file counts
    ``parameters()`` (each once, no buffers), and the streamed count of the shards must agree."""
    from hadaconv.stream import stored_parameters

    model = make_tiny("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    twice = stored_parameters(model, names)
    assert sum(dict(model.named_parameters(remove_duplicate=False))[n].numel() for n in twice) == \
        sum(p.numel() for p in model.parameters())
    assert ("lm_head.weight" in twice) != ("model.embed_tokens.weight" in twice)
    head_only = [n for n in names if n != "model.embed_tokens.weight"]  # stored under the head's name alone
    assert "lm_head.weight" in stored_parameters(model, head_only)
    assert stored_parameters(model, ["model.rotary_emb.inv_freq", "model.norm.weight"]) == ["model.norm.weight"]
