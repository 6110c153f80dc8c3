"""Distillation: loss goes down, local reconstruction helps each block, resume is exact, two DDP
ranks equal one process, encoders run, the CLI end to end and its errors."""

import copy
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hadaconv
from hadaconv.convert import patch
from hadaconv.distill import DistillConfig, distill
from hadaconv.distill.losses import forward, kl_loss
from hadaconv.errors import HadaconvError
from hadaconv.io import hadaconv_meta, load_model, load_tokenizer, save_converted
from cli_runner import run_cli as _cli
from tiny_models import make_tiny, tokenizer_folder

# A small, quick run: 48 windows of 16 tokens of the plays (what _windows measures on), no progress
# bar, rare evaluations, float32 forward passes on every machine (the default autocasts to
# bfloat16 where the CPU multiplies it natively: test_bf16_autocast covers that path).
RUN = dict(samples=48, seq_len=16, batch_size=4, eval_windows=2, eval_every=100, local_windows=8,
           local_steps=10, progress=False, data=["shakespeare"], bf16=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one thread is ~10x faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder())


def _pair(family: str, tokenizer):
    """(student, teacher): the student is the teacher with every W_o patched to a fresh block-4
    Hadamard projection (far from the teacher, so distillation has something to win back)."""
    teacher = make_tiny(family)
    return patch(copy.deepcopy(teacher), block=4), teacher


def _windows(tokenizer, n=8, seq=16):
    from hadaconv.calibrate import load_texts, token_windows

    return token_windows(tokenizer, load_texts(None), samples=n, seq_len=seq, heldout=0)[0]


# Held-out text of another domain than the training windows (Shakespeare): the measurements
# below are the tests' own, independent of the run's bookkeeping, whose best-state choice alone
# guarantees that its reported "after" is no worse than "before".
PROSE = ("The committee met on Tuesday to review the quarterly budget. Several members asked why the cost of "
         "maintaining the bridge had doubled since last spring, and the engineer explained that corrosion in the "
         "lower supports was worse than the first survey suggested. After a long discussion, they agreed to hire "
         "an independent inspector, to publish the report online, and to postpone the vote on new lighting until "
         "the repairs are finished. Meanwhile the library will extend its opening hours during the exam period, "
         "the school bus route will change to avoid the construction site, and volunteers are still needed for the "
         "autumn market, which starts at nine o'clock in the square next to the old railway station.")


def _heldout(tokenizer):
    from hadaconv.evaluate import text_windows

    return text_windows(tokenizer, PROSE, 16, 8)


def _block_errors(student, teacher, ids) -> float:
    """Summed relative squared error of the student's attention blocks fed the teacher's own
    block inputs (what the local stage trains), on ``ids``."""
    total = 0.0
    for i, block in enumerate(teacher.model.layers):
        seen = []
        hook = block.self_attn.register_forward_hook(lambda m, a, k, out: seen.append((a, k, out[0])),
                                                     with_kwargs=True)
        try:
            with torch.no_grad():
                teacher(input_ids=ids, use_cache=False)
        finally:
            hook.remove()
        (args, kwargs, want), = seen
        with torch.no_grad():
            got = student.model.layers[i].self_attn(*args, **kwargs)[0]
        total += ((got - want).square().sum() / want.square().sum()).item()
    return total


def _kl(student, teacher, ids):
    with torch.no_grad():
        return kl_loss(forward(student, ids, "causal-lm").main, forward(teacher, ids, "causal-lm").main).item()


def test_global_kd_lowers_the_divergence(tokenizer):
    student, teacher = _pair("llama", tokenizer)
    ids, held = _windows(tokenizer), _heldout(tokenizer)
    before, held_before = _kl(student, teacher, ids), _kl(student, teacher, held)
    losses = []
    report = distill(student, teacher, tokenizer,
                     DistillConfig(stages=["global"], train="attention", max_steps=20, lr=3e-3, warmup_steps=2,
                                   **RUN),
                     callback=lambda info: losses.append(info["loss"]))
    assert len(losses) == 20 and report.steps == 20 and report.tokens == 20 * 4 * 16
    assert _kl(student, teacher, ids) < 0.7 * before
    assert _kl(student, teacher, held) < 0.8 * held_before  # measured 0.68 x
    assert report.teacher is not None and report.before is not None
    assert not student.training and all(p.requires_grad for p in student.parameters())
    # The state kept is the one closest to the teacher on the held-out windows.
    kept = min(report.curve, key=lambda p: p["eval_loss"])
    assert report.best_step == kept["step"] == 20 and report.loss_after == kept["eval_loss"] < report.loss_before


def test_a_model_distilled_in_memory_saves_with_its_report(tokenizer, tmp_path):
    """hadaconv.save takes the DistillReport itself and writes the ``distill`` section that
    ``hadaconv distill`` writes; the folder loads back to the distilled model."""
    student, teacher = _pair("llama", tokenizer)
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=2, **RUN))
    out = hadaconv.save(student, tmp_path / "out", tokenizer=tokenizer, report=report)
    assert json.loads((out / "report.json").read_text()) == {"distill": json.loads(json.dumps(report.to_dict()))}
    ids = _heldout(tokenizer)
    with torch.no_grad():
        assert torch.equal(hadaconv.load(out)(ids).logits, student(ids).logits)


def test_the_curve_says_when_the_train_loss_is_another_quantity(tokenizer):
    """The curve's caption compares the train loss with the held-out one only where both are the
    KL to the teacher: an encoder's loss, a hidden-state term or a temperature make it another
    quantity, which the caption says (a newcomer read 0.13 against 0.04 as a bug)."""
    from hadaconv.distill.core import DistillReport, _objective

    plain = DistillConfig()
    assert _objective("perplexity", plain) == ""
    assert _objective("perplexity", replace(plain, hidden_weight=0.5)) == \
        "KL to teacher + 0.5 x per-layer hidden-state MSE"
    assert _objective("perplexity", replace(plain, temperature=2.0)) == "KL to teacher at temperature 2"
    assert _objective("embedding cosine", plain) == "relative hidden-state MSE + 1 - embedding cosine"
    student, teacher = _pair("bert", tokenizer)
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, **RUN))
    caption = str(report.curve_table().caption)
    assert "(relative hidden-state MSE + 1 - embedding cosine), another quantity than the held-out" in caption
    assert "sits below" in str(DistillReport("causal-lm", "perplexity", ["global"], "all", "x").curve_table().caption)


def test_stage_options_are_config_fields():
    """A misspelt name in STAGE_OPTIONS would switch its refusal off without a word."""
    from dataclasses import fields

    from hadaconv.distill.core import STAGE_OPTIONS

    names = {f.name for f in fields(DistillConfig)}
    assert all(set(stage) <= names for stage in STAGE_OPTIONS.values())


def test_gradient_checkpointing_recomputes_the_same_steps(tokenizer, recwarn):
    """--gradient-checkpointing is on during the steps (and off after) and changes no number: the
    tiny model has no dropout, so the recomputed activations are the stored ones.  Nothing it
    calls is deprecated (transformers 5 renamed gradient_checkpointing_enable)."""
    student, teacher = _pair("llama", tokenizer)
    plain, checkpointed = copy.deepcopy(student), copy.deepcopy(student)
    cfg = DistillConfig(stages=["global"], max_steps=3, lr=1e-3, **RUN)
    distill(plain, teacher, tokenizer, cfg)
    during = []
    distill(checkpointed, teacher, tokenizer, replace(cfg, gradient_checkpointing=True),
            callback=lambda info: during.append(checkpointed.is_activation_checkpointing))
    assert during == [True] * 3 and not checkpointed.is_activation_checkpointing and not checkpointed.training
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]


def test_no_finite_evaluation_keeps_the_start(tokenizer, monkeypatch):
    """Evaluations that are all NaN (a state that overflowed) keep the start, not a crash (no
    state was ever 'best'); a finite one after NaN ones is kept over them."""
    import hadaconv.distill.core as core

    student, teacher = _pair("llama", tokenizer)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    real = core._Evaluator.__call__
    monkeypatch.setattr(core._Evaluator, "__call__",
                        lambda self, model: real(self, model) if model is self.teacher else (math.nan, math.nan))
    cfg = DistillConfig(stages=["global"], max_steps=4, lr=3e-3, warmup_steps=1, **{**RUN, "eval_every": 2})
    report = distill(student, teacher, tokenizer, cfg)
    assert report.best_step == 0 and math.isnan(report.loss_after)
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
    calls = iter([(math.nan, math.nan), (5.0, 0.5), (math.nan, math.nan)])  # start, step 2, step 4
    monkeypatch.setattr(core._Evaluator, "__call__",
                        lambda self, model: real(self, model) if model is self.teacher else next(calls))
    report = distill(student, teacher, tokenizer, cfg)
    assert report.best_step == 2 and report.loss_after == 0.5


def test_bf16_autocast(tokenizer, monkeypatch):
    """bf16=True runs the forward passes under bfloat16 autocast on the CPU too (emulated where the
    CPU has no bfloat16 instructions) and still distills; None follows native_bf16."""
    from hadaconv.distill import core

    student, teacher = _pair("llama", tokenizer)
    ids = _windows(tokenizer)
    before = _kl(student, teacher, ids)
    cfg = DistillConfig(stages=["global"], train="attention", max_steps=20, lr=3e-3, warmup_steps=2,
                        **{**RUN, "bf16": True})
    report = distill(student, teacher, tokenizer, cfg)
    assert report.autocast == "bfloat16" and "autocast bfloat16" in str(report.table().caption)
    assert _kl(student, teacher, ids) < 0.7 * before  # in float32 (test_global_kd...): the same bound
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast leaves the weights alone
    for native in (True, False):
        monkeypatch.setattr(core, "native_bf16", lambda device, native=native: native)
        report = distill(copy.deepcopy(student), teacher, tokenizer,
                         DistillConfig(stages=["global"], max_steps=1, **{**RUN, "bf16": None}))
        assert report.autocast == ("bfloat16" if native else "off")
    report = distill(copy.deepcopy(student), teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, **RUN))
    assert report.autocast == "off"  # bf16=False wins over a native CPU


def test_float16_weights_are_refused_before_the_text(tokenizer, monkeypatch):
    """float16 weights (dtype="auto" on a float16 checkpoint, or a model halved by hand) are refused
    in one line before any text is prepared: AdamW on them, with no float32 master copy, took an
    encoder's embedding cosine from 0.97 to 0.42.  bfloat16 weights still train, not autocast."""
    from hadaconv.distill import core

    monkeypatch.setattr(core, "native_bf16", lambda device: True)
    student, teacher = (m.half() for m in _pair("bert", tokenizer))
    monkeypatch.setattr(core, "_texts", lambda *a: pytest.fail("refused only after the text was prepared"))
    for bf16 in (None, True, False):
        with pytest.raises(HadaconvError, match=r"^float16 weights do not train here: AdamW's updates underflow"):
            distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, **{**RUN, "bf16": bf16}))
    monkeypatch.undo()
    monkeypatch.setattr(core, "native_bf16", lambda device: True)
    student, teacher = (m.to(torch.bfloat16) for m in (student, teacher))
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, **{**RUN, "bf16": None}))
    assert report.autocast == "off" and report.steps == 1


def test_learning_rate_follows_the_share_of_blocks_converted(tokenizer):
    """With no lr given, the run's peak learning rate is 1e-4 times the share of attention blocks
    converted (all: 1e-4; one of the tiny model's two: 5e-5); a given lr is kept."""
    from hadaconv.distill import default_lr

    assert all(default_lr(n, n) == 1e-4 for n in range(1, 200))  # exactly: resume compares it
    assert abs(default_lr(10, 30) - 1e-4 / 3) < 1e-12
    teacher = make_tiny("llama")
    blocks = len(teacher.model.layers)
    for layers, given, expect in (([0], None, 1e-4 / blocks), (None, None, 1e-4), ([0], 3e-3, 3e-3)):
        student = patch(copy.deepcopy(teacher), block=4, layers=layers)
        report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, lr=given, **RUN))
        assert report.lr == expect and f"peak lr {expect:.2g}" in str(report.table().caption)


def test_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch):
    from hadaconv import device

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(device, "CPUINFO", str(info))
    cpu = torch.device("cpu")
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n")
    assert device.native_bf16(cpu)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert device.native_bf16(cpu)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not device.native_bf16(cpu)
    info.unlink()  # unreadable (not Linux): off
    assert not device.native_bf16(cpu)
    assert not device.native_bf16(torch.device("meta"))


def test_time_budget_leaves_out_preparing_the_text(tokenizer, monkeypatch):
    """Sampling the text (minutes the first time: distill samples what convert has not cached)
    must not use up --max-time: a 1.5 s text preparation under a 1 s budget still trains."""
    import time

    from hadaconv.distill import core

    real = core.calibration_texts

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "calibration_texts", slow)
    student, teacher = _pair("llama", tokenizer)
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_time=1.0, **RUN))
    assert report.steps > 0


def test_time_budget_is_when_training_ends(tokenizer, monkeypatch):
    """--max-time is kept, not overshot by a step and an evaluation: no step starts that would
    end, with the evaluation after it, past the budget.  A fake clock makes it exact: steps of
    1 s, evaluations of 0.5 s, 5.2 s allowed; the two opening evaluations end at 1 s, three steps
    and the closing evaluation at 4.5 s, where a fourth step would have ended at 5.5 s."""
    import types

    from hadaconv.distill import core

    clock = [0.0]
    monkeypatch.setattr(core, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                            monotonic=core.time.monotonic))

    def ticking(fn, seconds):
        def wrapped(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(core, "perplexity", ticking(core.perplexity, 0.5))
    monkeypatch.setattr(core._Distillation, "train_step", ticking(core._Distillation.train_step, 1.0))
    student, teacher = _pair("llama", tokenizer)
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_time=5.2, **RUN))
    assert report.steps == 3
    assert clock[0] == report.seconds == 4.5


def _calibration_asked(monkeypatch, keyword: str) -> list:
    """The ``keyword`` argument of each call distill makes to calibration_texts, in order."""
    from hadaconv.distill import core

    real, asked = core.calibration_texts, []

    def spy(*args, **kwargs):
        asked.append(kwargs[keyword])
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "calibration_texts", spy)
    return asked


def test_sampled_sets_how_much_text_the_teacher_writes(tokenizer, monkeypatch):
    """DistillConfig.sampled (--sampled) is the number of sequences asked of the sample cache, but
    never more than the run's windows (--samples: a newcomer's --samples 32 sampled 512, for 18
    minutes); fewer than one is refused before any work."""
    asked = _calibration_asked(monkeypatch, "samples")
    student, teacher = _pair("llama", tokenizer)
    distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, sampled=40, **RUN))
    distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, sampled=384, **RUN))
    assert asked == [40, RUN["samples"]] and RUN["samples"] < 384
    with pytest.raises(HadaconvError, match="sampled must be an integer >= 1, got 0"):
        distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, sampled=0, **RUN))
    assert asked == [40, RUN["samples"]]


def test_the_sampling_line_says_a_time_budget_starts_after_it(tokenizer, monkeypatch):
    """A newcomer's --max-time 90 sat 14 minutes in the sampling before it: the sampling line
    says the budget is training time only; with no time budget it says nothing of one."""
    from hadaconv.errors import cli_names

    said = _calibration_asked(monkeypatch, "waiting")
    student, teacher = _pair("llama", tokenizer)
    with cli_names():
        distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, max_time=90, **RUN))
    distill(student, teacher, tokenizer, DistillConfig(stages=["global"], max_steps=1, **RUN))
    assert said == ["--max-time (1 min 30 s) counts training only, which starts after it", ""], said


def test_too_few_windows_fail_before_any_text_is_sampled(tokenizer, monkeypatch):
    import hadaconv.distill.core as core
    from hadaconv.errors import InputError

    def never(*args, **kwargs):
        raise AssertionError("text was prepared before the check")

    monkeypatch.setattr(core, "calibration_texts", never)
    student, teacher = _pair("llama", tokenizer)
    with pytest.raises(InputError, match=r"no window is held out for evaluation from 9 training windows \(samples=9\)"):
        distill(student, teacher, tokenizer, DistillConfig(stages=["global"], **{**RUN, "samples": 9, "data": None}))
    # FSDP shards what the local stage trains whole: refused before any text too.
    with pytest.raises(HadaconvError, match="the local stage trains whole blocks on one device"):
        distill(student, teacher, tokenizer, DistillConfig(stages=["local", "global"], fsdp=True, **RUN))


def test_local_stage_reduces_every_block_error(tokenizer):
    """The stage itself (reconstruct_blocks, as distill calls it on one process)."""
    from contextlib import nullcontext

    from hadaconv.distill.core import converted_blocks
    from hadaconv.distill.local import reconstruct_blocks
    from hadaconv.distill.parallel import setup

    student, teacher = _pair("llama", tokenizer)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if "self_attn" not in n}
    held = _heldout(tokenizer)
    held_before = _block_errors(student, teacher, held)
    blocks = converted_blocks(student, teacher)
    d = setup("cpu")
    try:
        results = reconstruct_blocks(student, teacher, blocks, _windows(tokenizer),
                                     lambda ids: forward(teacher, ids, "causal-lm"),
                                     batch_size=4, steps=30, lr=1e-4, clip=1.0, d=d, autocast=nullcontext)
    finally:
        d.close()
    assert [r.name for r in results] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sum(r.error_after for r in results) < 0.95 * sum(r.error_before for r in results)
    # The blocks' reported errors never rise (a worse block is reverted): measure on held-out text.
    assert _block_errors(student, teacher, held) < 0.96 * held_before  # measured 0.93 x
    # Only the attention blocks moved.
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)


def test_local_stage_is_judged_by_the_distance_to_the_teacher(tokenizer, monkeypatch):
    """The held-out KL to the teacher decides whether the local stage stays, not perplexity: on
    this tiny random model the stage brings the student closer to the teacher while its held-out
    perplexity rises (31002 -> 31068), and is kept.  A stage that leaves the student further from
    the teacher is undone, every parameter back as it was."""
    import hadaconv.distill.core as core

    student, teacher = _pair("llama", tokenizer)
    report = distill(student, teacher, tokenizer,
                     DistillConfig(stages=["local"], train="attention", **{**RUN, "local_steps": 30}))
    assert sum(b["error_after"] for b in report.local) < 0.95 * sum(b["error_before"] for b in report.local)
    assert report.loss_after_local < report.loss_before and report.local_kept
    assert report.after_local > report.before  # perplexity would have undone it
    assert (report.after, report.loss_after) == (report.after_local, report.loss_after_local)

    def scrambled(student, teacher, blocks, *args, **kwargs):  # finite, and far from the teacher
        with torch.no_grad():
            for name in blocks:
                for p in student.get_submodule(name).parameters():
                    p.copy_(torch.randn_like(p))
        return []

    monkeypatch.setattr(core, "reconstruct_blocks", scrambled)
    student, teacher = _pair("llama", tokenizer)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["local"], train="attention", **RUN))
    assert report.loss_after_local > report.loss_before and not report.local_kept
    assert (report.after, report.loss_after) == (report.before, report.loss_before)
    assert all(torch.equal(p, start[n]) for n, p in student.named_parameters())


def test_resume_continues_exactly(tokenizer, tmp_path, capsys):
    base, teacher = _pair("llama", tokenizer)
    cfg = DistillConfig(stages=["local", "global"], max_steps=6, lr=1e-3, checkpoint_dir=str(tmp_path / "ckpt"),
                        checkpoint_every=3, **{**RUN, "eval_every": 2})
    whole = copy.deepcopy(base)
    expected = distill(whole, teacher, tokenizer, DistillConfig(**{**cfg.__dict__, "checkpoint_dir": None}))

    class Killed(Exception):
        pass

    def kill(info):
        if info["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        distill(copy.deepcopy(base), teacher, tokenizer, cfg, callback=kill)
    # The evaluation's cost is kept, so that a resumed --max-time run can plan its last step.
    from hadaconv.distill.checkpoint import FILE
    counters = torch.load(tmp_path / "ckpt" / FILE, weights_only=True)["counters"]
    assert counters["step"] == 3 and counters["eval_seconds"] > 0
    resumed_model = copy.deepcopy(base)
    capsys.readouterr()
    resumed = distill(resumed_model, teacher, tokenizer, DistillConfig(**{**cfg.__dict__, "resume": True,
                                                                          "progress": True}))
    said = " ".join(capsys.readouterr().err.split())  # a resumed run says so: its budget is partly spent
    assert f"resuming from the checkpoint in {tmp_path / 'ckpt'}: step 3, 192 tokens, " in said, said
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert resumed.steps == 6 and resumed.best_step == expected.best_step
    for key in ("metric", "eval_loss"):
        assert [p[key] for p in resumed.curve] == pytest.approx([p[key] for p in expected.curve], rel=1e-6)
    assert (resumed.loss_before, resumed.loss_after) == pytest.approx((expected.loss_before, expected.loss_after))
    assert resumed.eval_loss == expected.eval_loss
    assert "the budget is not the interrupted run's" not in said  # the same budget: nothing to say
    # A new budget bends the learning-rate schedule (a function of the share spent): said on resuming.
    longer = distill(copy.deepcopy(base), teacher, tokenizer,
                     DistillConfig(**{**cfg.__dict__, "resume": True, "progress": True, "max_steps": 8}))
    said = " ".join(capsys.readouterr().err.split())
    assert longer.steps == 8
    assert "note: the budget is not the interrupted run's (6 steps then, 8 steps now): the learning rate follows " \
           "this run's from here" in said, said
    # Other settings refuse the checkpoint.
    with pytest.raises(hadaconv.HadaconvError, match=rf"other settings \(lr: {cfg.lr!r} there, 0.01 here\); "
                                                     "remove it or give its settings"):
        distill(copy.deepcopy(base), teacher, tokenizer, DistillConfig(**{**cfg.__dict__, "resume": True, "lr": 1e-2}))
    # A checkpoint of a hadaconv that chose its state by perplexity (no "selected_by") is refused
    # with its own message: no option of this run can match it.
    path = tmp_path / "ckpt" / "last.pt"
    payload = torch.load(path, weights_only=True)
    old = json.loads(payload["fingerprint"])
    del old["selected_by"]
    payload["fingerprint"] = json.dumps(old, sort_keys=True)
    torch.save(payload, path)
    with pytest.raises(hadaconv.HadaconvError, match="older hadaconv, which chose the state to keep by perplexity"):
        distill(copy.deepcopy(base), teacher, tokenizer, DistillConfig(**{**cfg.__dict__, "resume": True}))


def test_encoder_distillation_runs(tokenizer):
    from hadaconv.evaluate import embedding_cosine

    student, teacher = _pair("bert", tokenizer)
    held = _heldout(tokenizer)
    gap_before = 1 - embedding_cosine(student, teacher, held)
    report = distill(student, teacher, tokenizer, DistillConfig(stages=["local", "global"], max_steps=3, lr=1e-3,
                                                                hidden_weight=0.5, **RUN))
    assert report.metric == "embedding cosine" and report.steps == 3
    assert 0 < report.before <= 1
    assert 1 - embedding_cosine(student, teacher, held) < 0.7 * gap_before  # measured 0.41 x
    assert len(report.local) == 2


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A saved tiny llama (``tiny``) and its patched, saved conversion (``conv``), as convert
    would write it (the source recorded as a path relative to the working directory's parent is
    covered by hadaconv.io.original_path; here it is absolute)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_tiny("llama", root / "tiny")
    student = patch(copy.deepcopy(teacher), block=4)
    meta = hadaconv_meta(adapter="llama", layers=[0, 1], block=4, fit="none", width=64, m=1,
                         source=str(root / "tiny"))
    save_converted(student, root / "conv", meta=meta, tokenizer_source=root / "tiny", report={})
    return root


CLI_TEXT = ["--samples", "48", "--seq-len", "16", "--batch-size", "4", "--eval-windows", "2", "--no-bf16"]
CLI_RUN = [*CLI_TEXT, "--max-steps", "3", "--lr", "1e-3"]  # the global stage's options
CLI_LOCAL = [*CLI_TEXT, "--local-steps", "4"]  # the local stage's (each stage refuses the other's)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_end_to_end_and_two_ddp_ranks_equal_one_process(converted, capsys):
    one, two = converted / "one", converted / "two"
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", one, *CLI_RUN)
    assert code == 0, err
    assert "perplexity" in out and "teacher" in out
    assert not Path(f"{one}.ckpt").exists()  # default checkpoints go once the output is saved
    model = hadaconv.load(one)
    meta = json.loads((one / "config.json").read_text())["hadaconv"]
    assert meta["layers"] == [0, 1] and meta["distill"]["steps"] == 3
    saved = json.loads((one / "report.json").read_text())["distill"]
    assert saved["curve"] and saved["seq_len"] == 16 and saved["eval_windows"] == 2
    assert saved["train_windows"] == 44 and "sampled from the model" in saved["data_source"]  # 48 less 4 held out
    assert "sampled from the model" in " ".join(out.split())  # the caption says what it trained on
    assert sum(isinstance(m, hadaconv.HadamardProjection) for m in model.modules()) == 2

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        "-m", "hadaconv.cli", "--", "distill", str(converted / "conv"), "-o", str(two), *CLI_RUN],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved") == 1  # rank 0 alone writes and reports
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    assert json.loads((two / "config.json").read_text())["hadaconv"]["distill"]["world_size"] == 2


def test_cli_teacher_as_bare_weights_with_its_config(converted, capsys):
    """A teacher given as a bare safetensors file and --config (as convert read it), or recorded
    so with its config by the conversion, trains the student exactly as the teacher's folder does."""
    recorded = converted / "conv-bare"
    shutil.copytree(converted / "conv", recorded)
    config = json.loads((recorded / "config.json").read_text())
    config["hadaconv"] |= {"source": str(converted / "tiny" / "model.safetensors"),
                           "source_config": str(converted / "tiny" / "config.json")}
    (recorded / "config.json").write_text(json.dumps(config))
    runs = {"folder": ("conv", ["--teacher", converted / "tiny"]),
            "bare": ("conv", ["--teacher", converted / "tiny" / "model.safetensors", "--config", converted / "tiny"]),
            "recorded": ("conv-bare", [])}
    for name, (student, teacher) in runs.items():
        code, _, err = _cli(capsys, "distill", converted / student, "-o", converted / f"t-{name}", *teacher, *CLI_RUN)
        assert code == 0, err
    a, b, c = (load_file(converted / f"t-{name}" / "model.safetensors") for name in runs)
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    start = load_file(converted / "conv" / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained: equal runs, not two untouched copies
    summary = json.loads((converted / "t-bare" / "config.json").read_text())["hadaconv"]["distill"]
    assert summary["teacher_config"] == str(converted / "tiny")


def test_cli_says_when_sampled_is_capped_by_samples(converted, capsys):
    """--sampled past --samples samples only the windows the run reads, and says so."""
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "capped", *CLI_RUN,
                        "--sampled", "100")
    assert code == 0, err
    assert "note: --sampled 100 is more than the 48 windows the run reads (--samples): 48 are sampled" in \
        " ".join(err.split())


def test_a_failed_plot_costs_no_distilled_model(converted, capsys, monkeypatch):
    """The curve is written inside the atomic save, so a plot that fails must not fail the save."""
    import hadaconv.distill.files as files

    monkeypatch.setattr(files, "plot_curve", lambda report, path: (Path(path).write_bytes(b"half"),
                                                                   1 / 0))
    out_dir = converted / "no-curve"
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", out_dir, *CLI_RUN)
    assert code == 0, err
    assert "note: no distill_curve.png: plotting failed (ZeroDivisionError" in " ".join(err.split())
    assert (out_dir / "model.safetensors").is_file() and not (out_dir / "distill_curve.png").exists()


def test_a_damaged_conversion_report_costs_no_distilled_model(converted, capsys):
    """The converted folder's report.json is untrusted: one that is not a JSON object is said and
    left out, read before the run (it used to fail the save after the training)."""
    import shutil

    damaged = converted / "damaged-report"
    shutil.copytree(converted / "conv", damaged)
    (damaged / "report.json").write_text("[1, 2]")
    out_dir = converted / "from-damaged"
    code, _, err = _cli(capsys, "distill", damaged, "-o", out_dir, *CLI_RUN)
    assert code == 0, err
    assert "warning: the conversion's report is not carried over" in " ".join(err.split())
    assert json.loads((out_dir / "report.json").read_text())["distill"]["curve"]


def test_cli_removes_only_its_own_checkpoint_from_the_default_folder(converted, capsys):
    """OUTPUT.ckpt goes once the output is saved, but only what the run wrote there: the folder
    may be the user's (it used to be deleted whole)."""
    out_dir = converted / "kept-notes"
    ckpt = Path(f"{out_dir}.ckpt")
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", out_dir, *CLI_RUN, "--checkpoint-every", "1",
                        "--eval-every", "3")
    assert code == 0, err
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt"]
    # The last step's checkpoint, evaluated in the loop, is not written (and said) a second time after it.
    assert re.findall(r"checkpoint at step (\d+):", " ".join(err.split())) == ["1", "2", "3"], err


def test_cli_says_when_nothing_improved(converted, capsys):
    """A run whose evaluations never beat the start saves the converted model unchanged, and says so."""
    out_dir = converted / "unchanged"
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", out_dir, "--global", *CLI_RUN, "--lr", "1e-30")
    assert code == 0, err
    assert "no evaluation beat the global stage's start" in err and "holds the converted model" in err
    assert "(no step lowered the KL to teacher: the start kept)" in " ".join(out.split()), out
    assert str(out_dir) in err
    a, b = load_file(converted / "conv" / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # After a local stage the global stage starts from its result, which is what is kept.
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "unchanged-local", "--local",
                        "--global", *CLI_RUN, "--local-steps", "4", "--lr", "1e-30")
    assert code == 0, err
    assert "holds the local stage's result" in err


def test_cli_local_stage_alone_and_undone_when_worse(converted, capsys, monkeypatch):
    """--local alone: a table of its own stage (no curve, no global counts); a local stage that
    leaves the held-out metric worse is undone and says so, and --resume without a checkpoint
    says it starts from the beginning."""
    import hadaconv.distill.core as core

    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "local", "--local", *CLI_LOCAL)
    assert code == 0, err
    out = " ".join(out.split())
    assert "local stage: 2 blocks x 4 steps" in out and "global stage" not in out, out
    assert "after distillation" not in out and "vs training tokens" not in out, out  # no global stage, no curve

    def diverged(student, teacher, blocks, *args, **kwargs):  # a local stage that blew up
        with torch.no_grad():
            for name in blocks:
                for p in student.get_submodule(name).parameters():
                    p.fill_(float("nan"))
        return []

    monkeypatch.setattr(core, "reconstruct_blocks", diverged)
    out_dir = converted / "local-undone"
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", out_dir, "--local", "--resume", *CLI_LOCAL)
    assert code == 0, err
    assert f"--resume found no checkpoint in {out_dir}.ckpt" in err, err
    assert "the local stage left the held-out KL to teacher (nats/token) worse (" in err and " -> nan)" in err, err
    assert "undone" in err
    assert "(worse: undone)" in " ".join(out.split())
    a, b = load_file(converted / "conv" / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the converted model, as it came in
    report = json.loads((out_dir / "report.json").read_text())["distill"]
    assert report["local_kept"] is False and report["after"] == report["before"]
    assert report["after_local"] != report["after_local"]  # the NaN it measured, recorded


def test_cli_auto_dtype_on_a_float16_checkpoint_is_refused_with_the_flag(converted, tmp_path, capsys):
    """--dtype auto on a float16 converted folder: the refusal (from distill() itself, after the
    load) names --dtype float32, the way out on the command line, not the in-memory .float()."""
    half = hadaconv.load(converted / "conv").half()
    hadaconv.save(half, tmp_path / "half", tokenizer=load_tokenizer(converted / "tiny"), source=converted / "tiny")
    code, _, err = _cli(capsys, "distill", tmp_path / "half", "-o", tmp_path / "out", "--dtype", "auto", *CLI_RUN)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip() == ("error: float16 weights do not train here: AdamW's updates underflow and blow up without "
                           "float32 master weights; load them in float32 (--dtype float32, the default), whose "
                           "forward passes --bf16 runs in bfloat16"), err
    assert not (tmp_path / "out").exists()


def test_cli_without_a_budget_says_it_runs_one_pass(converted, capsys):
    no_budget = [a for i, a in enumerate(CLI_RUN) if "--max-steps" not in CLI_RUN[max(0, i - 1):i + 1]]
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "one-pass", *no_budget,
                          "--eval-every", "5", "--checkpoint-every", "4")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "no budget given (--max-time / --max-steps / --max-tokens): one pass over 44 windows, 11 steps of 4" in flat, err
    # Evaluations are not silent: their cost is announced, and each says what it measured.
    assert re.search(r"each evaluation on 2 held-out windows takes (about \d|under 1 s)", flat), err
    assert "every 5 steps (inside the budget) and at the last step" in flat, err
    for step in (5, 10, 11):
        assert f"step {step}: held-out KL to teacher (nats/token) " in flat, err
    for step in (4, 8, 11):  # checkpoints are gigabytes for a real model: each is said, with its size (the last too)
        assert re.search(rf"checkpoint at step {step}: \S+one-pass\.ckpt/last\.pt \(\d\S* GB\)", flat), err


def test_held_out_text_that_is_training_text_is_noted(converted, tmp_path, capsys):
    """--eval-text naming a --data file (or a file in a --data folder): the state kept would be
    chosen on the text it trains on, which the run says."""
    text = tmp_path / "texts" / "t.txt"
    text.parent.mkdir()
    text.write_text(PROSE * 4)
    for data in (text, text.parent):
        code, _, err = _cli(capsys, "distill", converted / "conv", "-o", tmp_path / f"out-{data.name}", *CLI_RUN,
                            "--data", data, "--eval-text", text)
        assert code == 0, err
        assert re.search(r"note: the held-out text --eval-text \S+t\.txt is also training text \(--data\): the "
                         r"state kept is chosen on text the run trains on", " ".join(err.split())), err
    (tmp_path / "other.txt").write_text(PROSE * 3)  # beside the --data folder, not in it
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", tmp_path / "out-other", *CLI_RUN,
                        "--data", text.parent, "--eval-text", tmp_path / "other.txt")
    assert code == 0 and "also training text" not in err, err


def test_cli_warns_when_the_state_is_chosen_on_few_windows(converted, capsys):
    """Ten windows hold out one: the distilled state would be chosen on one window's noise
    without the user knowing (a newcomer's run on a short text did).  Two windows asked for
    with --eval-windows 2 are the user's choice, and not warned about (the other CLI tests)."""
    few = ["--samples", "10", "--seq-len", "16", "--batch-size", "4", "--max-steps", "1", "--no-bf16"]
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "few", *few)
    assert code == 0, err
    flat = " ".join(err.split())
    # The text had more to give: a tenth of more --samples is held out.
    assert ("the distilled state is chosen on 1 held-out window of 16 tokens, a noisy choice: --samples 40 or "
            "more steadies it") in flat, err
    code, out, err = _cli(capsys, "distill", converted / "conv", "-o", converted / "few-asked", *CLI_RUN)
    assert code == 0 and "noisy choice" not in err, err


def test_cli_eval_names_its_text_and_compares_with_the_original(converted, tmp_path, capsys):
    """hadaconv eval says which text its number is on (the default is a Shakespeare play) and,
    for a converted folder, evaluates the recorded original on the same windows."""
    from hadaconv.evaluate import perplexity, text_windows

    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 40)
    args = ["eval", converted / "conv", "--text", text, "--seq-len", "16", "--max-windows", "2"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    m = re.fullmatch(r"perplexity ([\d.]+) over 30 tokens of prose\.txt \(2 windows of 16\)\n"
                     r"baseline (.+): perplexity ([\d.]+) on the same windows; .+ is ([\d.]+)x that\n", out)
    assert m, out
    assert m[2] == f"{converted.name}/tiny" and f"now {converted / 'tiny'} on the same windows" in err
    original = load_model(converted / "tiny")
    windows = text_windows(original.tokenizer, text.read_text(), 16, 2)
    assert float(m[3]) == pytest.approx(perplexity(original.model, windows).perplexity, abs=6e-4)
    assert float(m[4]) == pytest.approx(float(m[1]) / float(m[3]), abs=6e-4)
    assert float(m[1]) != pytest.approx(float(m[3]), rel=1e-3)  # two models, two numbers

    code, out, err = _cli(capsys, *args, "--no-baseline")
    assert code == 0 and out.count("\n") == 1 and "baseline" not in out, err
    # Without --seq-len: 512 tokens, or the model's context where shorter (the tiny model's 128).
    code, out, err = _cli(capsys, "eval", converted / "conv", "--text", text, "--max-windows", "1", "--no-baseline")
    assert code == 0 and out.endswith("(1 window of 128)\n"), (out, err)
    code, out, err = _cli(capsys, *args, "--baseline", converted / "tiny", "--no-baseline")
    assert code == 1 and "not both" in err
    moved = tmp_path / "moved"
    shutil.copytree(converted / "conv", moved)
    config = json.loads((moved / "config.json").read_text())
    config["hadaconv"]["source"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    code, out, err = _cli(capsys, "eval", moved, "--text", text, "--seq-len", "16", "--max-windows", "2")
    assert code == 0 and out.startswith("perplexity") and "baseline" not in out
    assert err.startswith("note: no baseline:") and "--baseline" in err


def test_cli_interrupt_names_the_checkpoint(converted, tmp_path, capsys, monkeypatch):
    """Ctrl-C after a checkpoint was written: exit 130 and one line saying where it is, the step it
    was written at (where it can be read), and how to resume."""
    import hadaconv.distill
    from hadaconv.distill.checkpoint import FILE

    def interrupted(converted_dir, output, cfg, payload):
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        torch.save(payload, Path(cfg.checkpoint_dir) / FILE)
        raise KeyboardInterrupt

    for payload, at in (({"counters": {"step": 7}}, ", written at step 7,"), ({}, "")):
        monkeypatch.setattr(hadaconv.distill, "distill_file", lambda *a, **k: interrupted(*a, payload=payload))
        code, _, err = _cli(capsys, "distill", converted / "conv", "-o", tmp_path / "out", *CLI_RUN)
        assert code == 130
        assert err.strip() == (f"interrupted: the last checkpoint{at} is in {tmp_path / 'out'}.ckpt; rerun the same "
                               "command with --resume to continue from it")
        shutil.rmtree(f"{tmp_path / 'out'}.ckpt")


def test_cli_interrupt_before_a_checkpoint_says_nothing_was_saved(converted, tmp_path, capsys, monkeypatch):
    import hadaconv.distill

    def interrupted(converted_dir, output, cfg, **kwargs):
        Path(cfg.checkpoint_dir).mkdir(parents=True)  # stopped while the first checkpoint was written
        raise KeyboardInterrupt

    monkeypatch.setattr(hadaconv.distill, "distill_file", interrupted)
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", tmp_path / "out", *CLI_RUN)
    assert code == 130 and list(tmp_path.iterdir()) == []  # no empty checkpoint folder left behind
    assert err.strip() == ("interrupted before the first checkpoint (every 100 steps, --checkpoint-every) or while "
                           "the text was prepared: no training state was saved, and --resume would start from the "
                           "beginning (sampled text is cached a chunk at a time)")


@pytest.mark.parametrize("case", ["teacher", "unconverted", "max-time", "eval-text", "batch", "sampled",
                                  "sampled-data", "exists"])
def test_cli_bad_input_is_one_line(case, converted, tmp_path, capsys):
    conv, args = converted / "conv", []
    if case == "teacher":
        args = ["--teacher", tmp_path / "missing"]
    elif case == "unconverted":
        conv = converted / "tiny"
    elif case == "max-time":
        args = ["--max-time", "soon"]
    elif case == "eval-text":
        args = ["--eval-text", tmp_path / "missing.txt"]
    elif case == "batch":
        args = ["--batch-size", "4", "--accumulate", "3"]
    elif case == "sampled":
        args = ["--sampled", "0"]
    elif case == "sampled-data":  # --sampled means nothing without --data sample
        (tmp_path / "t.txt").write_text("some text of the user's own " * 50)
        args = ["--data", tmp_path / "t.txt", "--sampled", "300"]
    elif case == "exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("x")
    code, _, err = _cli(capsys, "distill", conv, "-o", tmp_path / "out", *args, "--max-steps", "1",
                        "--samples", "16", "--seq-len", "16")
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case == "exists" or not (tmp_path / "out").exists()


def test_fsdp2_two_ranks_equal_one_process(converted, capsys):
    """FSDP2 (fully_shard) runs on gloo CPU ranks too: the global stage, sharded over two
    processes, ends where one process ends."""
    one, two = converted / "g-one", converted / "g-two"
    code, _, err = _cli(capsys, "distill", converted / "conv", "-o", one, "--global", *CLI_RUN)
    assert code == 0, err
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        "-m", "hadaconv.cli", "--", "distill", str(converted / "conv"), "-o", str(two), "--global",
                        "--fsdp", *CLI_RUN], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_the_documented_torchrun_line_passes_every_option_through():
    """torchrun's parser takes --local for an abbreviation of its own --local-addr and stops; after
    the README's `--`, hadaconv's options reach hadaconv as given."""
    from torch.distributed.run import get_args_parser

    head = ["--nproc-per-node", "2", "-m", "hadaconv.cli"]
    ours = ["distill", "conv", "-o", "out", "--local", "--global", "--local-steps", "4", "--max-steps", "3"]
    args = get_args_parser().parse_args([*head, "--", *ours])
    assert (args.training_script, args.training_script_args) == ("hadaconv.cli", ours)
    if sys.version_info < (3, 12):  # the failure the `--` avoids, seen on 3.11: "ambiguous option: --local"
        with pytest.raises(SystemExit):
            get_args_parser().parse_args([*head, *ours])


@pytest.mark.parametrize("payload", [{"fingerprint": "not json"}, {"counters": {}}, [1, 2],
                                     {"fingerprint": "[1, 2]"}, {"fingerprint": "{}", "counters": {}},
                                     {"fingerprint": "{}", "trainable": {}, "optimizer": {}, "rng": {"cpu": 1.5}}])
def test_a_damaged_checkpoint_is_one_line(tmp_path, payload):
    """--resume reads last.pt, which may be damaged by something else than hadaconv (written
    atomically): whatever is wrong inside it, the error says which file and what to do, both in
    the check of its settings before the load and in the resume itself."""
    from hadaconv.distill.checkpoint import FILE, check_settings, load_checkpoint
    from hadaconv.errors import HadaconvError

    torch.save(payload, tmp_path / FILE)
    model = torch.nn.Linear(2, 2)
    damaged = rf"^the checkpoint .*{FILE} is damaged \(.*\): remove it to start again$"
    with pytest.raises(HadaconvError, match=damaged):
        load_checkpoint(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), fingerprint={})
    if not (isinstance(payload, dict) and payload.get("fingerprint") == "{}"):  # settings that match: no refusal
        with pytest.raises(HadaconvError, match=damaged):
            check_settings(tmp_path, {})


@pytest.mark.parametrize("kind", ["empty", "text", "legacy torch.save"])
def test_a_checkpoint_that_is_no_archive_is_one_line(tmp_path, kind):
    """A last.pt that torch.save did not write as its zip archive (empty, text, the legacy format)
    is named as such before and at the resume; mmap's advice on how to save it is no use here."""
    from hadaconv.distill.checkpoint import FILE, check_settings, checkpoint_step, load_checkpoint
    from hadaconv.errors import HadaconvError

    path = tmp_path / FILE
    if kind == "legacy torch.save":
        torch.save({"fingerprint": "{}"}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_text("" if kind == "empty" else "step 7\n")
    model = torch.nn.Linear(2, 2)
    no_archive = rf"^the checkpoint .*{FILE} is not one hadaconv wrote \(not a torch.save archive\): remove it"
    with pytest.raises(HadaconvError, match=no_archive):
        check_settings(tmp_path, {})
    with pytest.raises(HadaconvError, match=no_archive):
        load_checkpoint(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), fingerprint={})
    assert checkpoint_step(path) is None
