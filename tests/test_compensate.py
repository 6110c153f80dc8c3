"""Error compensation in a dense neighbour (hadaconv.compensate) and the block loop that feeds it."""

import copy

import pytest
import torch
from tiny_models import make_tiny, tokenizer_folder
from transformers import AutoTokenizer

from hadaconv.compensate import RidgeSums, refit
from hadaconv.convert import ConvertConfig, convert


def _sums(u, z, change, bias):
    s = RidgeSums(bias=bias)
    s.add(u, z, change)
    return s


@pytest.mark.parametrize("bias", [False, True])
def test_refit_cancels_an_error_it_can_cancel(bias):
    """Targets that a map of this shape can produce exactly: the refit recovers that map (float64),
    and the error read from the sums equals the error computed on the tokens."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 600, 24, 10
    u = torch.randn(n, d_in, generator=g, dtype=torch.float64) + 0.3
    w_true = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b_true = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    z = u @ w_true.T + (b_true if bias else 0)
    w0 = w_true + 0.5 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b0 = b_true + 0.5 if bias else None
    change = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    calib, held = _sums(u[:500], z[:500], change[:500], bias), _sums(u[500:], z[500:], change[500:], bias)
    direct = ((z[500:] - u[500:] @ w0.T - (b0 if bias else 0)).square().sum() / change[500:].square().sum()).sqrt()
    comp = refit(w0, b0, calib, held, alphas=(1e-12,))
    assert comp.error_before == pytest.approx(direct.item(), rel=1e-9)
    torch.testing.assert_close(comp.weight, w_true, rtol=0, atol=1e-8)
    if bias:
        torch.testing.assert_close(comp.bias, b_true, rtol=0, atol=1e-8)
    assert comp.alpha == 1e-12 and comp.error_after < 1e-6 < comp.error_before


def test_refit_keeps_the_original_when_nothing_helps():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(400, 8, generator=g, dtype=torch.float64)
    w0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    z = u @ w0.T
    comp = refit(w0, None, _sums(u[:300], z[:300], z[:300], False), _sums(u[300:], z[300:], z[300:], False))
    assert comp.alpha is None and torch.equal(comp.weight, w0) and comp.error_after == comp.error_before == 0


def test_refit_rejects_mismatched_sums():
    with pytest.raises(ValueError):
        refit(torch.zeros(2, 3), None, RidgeSums())
    s = _sums(torch.ones(4, 3), torch.ones(4, 2), None, True)
    with pytest.raises(ValueError, match="bias"):
        refit(torch.zeros(2, 3), None, s)


def test_compensation_improves_a_tiny_models_block_output():
    """Block 0 sees the same input in the original and the converted model, so its output error
    can be measured directly on the held-out calibration windows: without compensation it is the
    report's "before", with it the report's "after", and lower; lower too on fresh text."""
    from hadaconv.convert import calibration_batches

    tok = AutoTokenizer.from_pretrained(tokenizer_folder())
    teacher = make_tiny("llama")
    cfg = dict(block=4, samples=200, seq_len=32, batch_size=20, max_iter=10, sensitivity=False, progress=False)
    plain, comp = copy.deepcopy(teacher), copy.deepcopy(teacher)
    convert(plain, tok, ConvertConfig(compensate=False, **cfg))
    report = convert(comp, tok, ConvertConfig(compensate=True, **cfg))
    row = report.layers[0]
    assert report.compensate and row.compensation_ridge is not None
    held = torch.cat([b["input_ids"] for b in calibration_batches(teacher, tok, ConvertConfig(**cfg)).heldout])

    def block0_errors(ids):
        """Relative error of block 0's output (plain and compensated) against the teacher's."""
        with torch.no_grad():
            x, t = (h.double() for h in teacher(input_ids=ids, output_hidden_states=True).hidden_states[:2])
            return {name: ((m(input_ids=ids, output_hidden_states=True).hidden_states[1].double() - t).norm()
                           / (t - x).norm()).item() for name, m in (("plain", plain), ("comp", comp))}

    err = block0_errors(held)
    assert err["plain"] == pytest.approx(row.block_error_before, rel=1e-4)
    assert err["comp"] == pytest.approx(row.block_error_after, rel=1e-4)
    assert err["comp"] < 0.995 * err["plain"]
    # Those windows also chose the ridge (and whether to keep the original map), so being lower
    # there is partly the choice's doing: fresh text from the same model, used by nothing above,
    # must show the improvement too (measured 0.996 x here, 0.994 x with seed 2).
    from hadaconv.calibrate import token_windows
    from hadaconv.sample import sample_texts

    fresh = token_windows(tok, sample_texts(teacher, tok, samples=24, seq_len=32, seed=1, progress=False),
                          samples=24, seq_len=32, heldout=0)[0]
    fresh_err = block0_errors(fresh)
    assert fresh_err["comp"] < 0.999 * fresh_err["plain"]
