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
