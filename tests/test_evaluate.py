"""Quality measures against float64 references computed here from the logits alone: perplexity
over windows and the KL to a reference model measured in the same pass, with a last batch
smaller than the others (each window and position must weigh alike)."""

import math

import pytest
import torch

from hadaconv.evaluate import perplexity
from tiny_models import VOCAB, make_tiny


def _reference(model, teacher, windows):
    """(perplexity, KL(teacher || model) per position) in float64, one window at a time."""
    nll, count, kl, positions = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for w in windows:
            s = model(input_ids=w[None]).logits[0].double().log_softmax(-1)
            t = teacher(input_ids=w[None]).logits[0].double().log_softmax(-1)
            nll -= s[:-1].gather(-1, w[1:, None]).sum().item()
            count += len(w) - 1
            kl += (t.exp() * (t - s)).sum().item()
            positions += len(w)
    return math.exp(nll / count), kl / positions


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_and_kl_to_a_reference_match_float64(batch_size):
    model, teacher = make_tiny("llama", seed=1), make_tiny("llama", seed=2)
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    want_ppl, want_kl = _reference(model, teacher, windows)
    p = perplexity(model, windows, batch_size, reference=teacher)
    assert p.perplexity == pytest.approx(want_ppl, rel=1e-5)
    assert p.kl == pytest.approx(want_kl, rel=1e-5) and p.kl > 0.01
    assert (p.tokens, p.windows) == (5 * 11, 5)
    alone = perplexity(model, windows, batch_size)
    assert alone.kl is None and alone.perplexity == pytest.approx(p.perplexity, rel=1e-6)
    assert perplexity(teacher, windows, batch_size, reference=teacher).kl == pytest.approx(0.0, abs=1e-6)


def _kl_float64(student, teacher, temperature):
    s = (student.double() / temperature).log_softmax(-1)
    t = (teacher.double() / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1 << 20, 3 * 50])  # one chunk; 3 rows a chunk, the last one partial
def test_kl_divergence_and_its_gradient_match_float64(monkeypatch, temperature, chunk):
    from hadaconv import evaluate

    monkeypatch.setitem(evaluate._KL_CHUNK, "cpu", chunk)
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 50, generator=gen)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 50, generator=gen)
    exact = student.detach().double().requires_grad_()
    want = _kl_float64(exact, teacher, temperature)
    want.backward()
    got = evaluate.kl_divergence(student, teacher, temperature)
    got.backward()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), exact.grad, rtol=1e-4, atol=1e-7)
    # A loss scaled downstream scales the gradient (the backward multiplies by the upstream gradient).
    student.grad = None
    (3 * evaluate.kl_divergence(student, teacher, temperature)).backward()
    torch.testing.assert_close(student.grad.double(), 3 * exact.grad, rtol=1e-4, atol=1e-7)


def test_kl_divergence_of_bfloat16_logits_keeps_the_gradient_in_bfloat16():
    from hadaconv.evaluate import kl_divergence

    gen = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(7, 40, generator=gen)).bfloat16().requires_grad_()
    teacher = (3 * torch.randn(7, 40, generator=gen)).bfloat16()
    exact = student.detach().double().requires_grad_()
    _kl_float64(exact, teacher, 1.0).backward()
    kl_divergence(student, teacher).backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.double(), exact.grad, rtol=1e-2, atol=1e-4)
    with torch.inference_mode():  # evaluation: no gradient kept, the same value
        assert kl_divergence(student, teacher).item() == pytest.approx(_kl_float64(student, teacher, 1.0).item(), rel=1e-5)


def test_kl_divergence_refuses_logits_of_two_shapes_or_none():
    from hadaconv.errors import InputError
    from hadaconv.evaluate import kl_divergence

    with pytest.raises(InputError, match="one shape"):
        kl_divergence(torch.zeros(2, 3, 5), torch.zeros(2, 3, 6))
    with pytest.raises(InputError, match="not empty"):
        kl_divergence(torch.zeros(0, 5), torch.zeros(0, 5))


def test_kl_divergence_of_a_sliced_logits_view_under_autocast_matches_float64():
    """The distillation loss sees logits sliced to the predicted positions and runs under autocast:
    neither may change the value or the gradient (the KL disables autocast inside)."""
    from hadaconv.evaluate import kl_divergence

    gen = torch.Generator().manual_seed(2)
    full = (3 * torch.randn(2, 6, 30, generator=gen)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 30, generator=gen)
    exact = full.detach().double().requires_grad_()
    _kl_float64(exact[:, :-1], teacher, 1.0).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kl_divergence(full[:, :-1], teacher)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(full.grad.double(), exact.grad, rtol=1e-4, atol=1e-7)


def test_kl_divergence_refuses_a_second_derivative_rather_than_return_zero():
    from hadaconv.evaluate import kl_divergence

    student = torch.randn(3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(kl_divergence(student, torch.randn(3, 8)), student, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_perplexity_shows_its_progress_unless_told_not_to(monkeypatch):
    """The Python API's perplexity runs minutes on a real model: a bar by default, as the CLI's."""
    import contextlib

    import hadaconv.evaluate as evaluate

    shown = []

    @contextlib.contextmanager
    def bar(total, description, enabled=True):
        shown.append((total, description, enabled))
        yield lambda: None

    monkeypatch.setattr(evaluate, "progress_bar", bar)
    model, windows = make_tiny("llama"), torch.randint(0, VOCAB, (5, 8))
    perplexity(model, windows, batch_size=2)
    perplexity(model, windows, batch_size=2, progress=None)
    assert shown == [(3, "perplexity", True), (3, "", False)]
