"""HadamardProjection: initialisation, state_dict round trip, training under torch.compile."""

import pytest
import torch

import hadaconv
from hadaconv import HadamardProjection
from hadaconv.errors import InputError
from hadaconv.hadamard import hadamard_matrix


@pytest.mark.parametrize("block", [1, 4, 12])
def test_identity_init_is_the_orthonormal_transform(block):
    layer = HadamardProjection(48, block=block).double()
    x = torch.randn(3, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), hadaconv.fwht(x), atol=1e-12, rtol=0)
    h = torch.tensor(hadamard_matrix(48, normalized=True))
    torch.testing.assert_close(layer.dense_weight(), h, atol=1e-12, rtol=0)


def test_parameters_and_repr():
    assert [p.shape for p in HadamardProjection(576).parameters()] == [(576,), (576,)]
    assert [p.shape for p in HadamardProjection(576, block=16).parameters()] == [(36, 16, 16), (576,)]
    assert [p.shape for p in HadamardProjection(576, bias=False).parameters()] == [(576,)]
    r = repr(HadamardProjection(576, block=16))
    assert "dim=576" in r and "block=16" in r and "36 x 2^4" in r


def test_bad_arguments():
    with pytest.raises(hadaconv.HadaconvError, match="92"):
        HadamardProjection(92)
    with pytest.raises(ValueError, match="divisor"):
        HadamardProjection(48, block=5)


def test_state_dict_round_trip():
    a = HadamardProjection(96, block=8)
    with torch.no_grad():
        a.gamma.normal_()
        a.beta.normal_()
    b = HadamardProjection(96, block=8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 96)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_trains_under_compile_like_eager():
    torch.manual_seed(0)
    target = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)

    def train(compiled: bool) -> torch.Tensor:
        torch.manual_seed(1)
        layer = HadamardProjection(64, block=4)
        step = torch.compile(layer) if compiled else layer
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(5):
            loss = (step(x) - target(x).detach()).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach()

    eager, compiled = train(False), train(True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_check_saves_names_the_largest_saving_block_or_rank():
    """One refusal for convert and inspect: the block or rank that saves nothing, the largest that
    saves any, and a block the user did not choose named as the default."""
    from hadaconv.nn import check_saves

    check_saves("o", 64, 64, False, 8, 27)  # 64 x 64 at block 8 keeps 576 + 27 x 128: still saves
    with pytest.raises(InputError, match=r"^rank=28 saves no parameters at o \(64x64, block 8\): the residual keeps "
                                         r"3,584; the largest rank that saves any is 27$"):
        check_saves("o", 64, 64, False, 8, 28)
    with pytest.raises(InputError, match=r"^the default block 64 \(block\) saves no parameters at o \(64x64\): gamma "
                                         r"and beta keep 4,160 against the dense 4,096; the largest block that saves "
                                         r"any is 32$"):
        check_saves("o", 64, 64, False, 64, block_given=False)
