"""ift.scan.discounted_cumsum: exact, stable, differentiable, with the optional kernel made safe."""

import pytest
import torch

from ift.scan import discounted_cumsum, discounted_cumsum_reference, kernel_available

GAMMAS = [0.0, 0.5, 0.95, 0.999, 1.0]


def max_relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


def test_hand_worked_example():
    # y3 = 4; y2 = 3 + .5*4 = 5; y1 = 2 + .5*5 = 4.5; y0 = 1 + .5*4.5 = 3.25
    y = discounted_cumsum(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 0.5)
    assert y.tolist() == [[3.25, 4.5, 5.0, 4.0]]


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("length", [1, 63, 64, 65, 1000, 2048, 8192])
def test_matches_float64_loop_within_1e5_relative(gamma, length):
    # Positive inputs, like the per-token losses IFT scans, so elementwise relative error is meaningful.
    x = torch.rand(64, length, generator=torch.Generator().manual_seed(length)) + 1e-3
    y = discounted_cumsum(x, gamma)
    assert torch.isfinite(y).all()
    assert max_relative_error(y, discounted_cumsum_reference(x, gamma)) <= 1e-5


def test_long_sequence_does_not_overflow_where_the_power_trick_does():
    x = torch.rand(4, 8192) + 1e-3
    trick = torch.cumsum((x * 0.95 ** -torch.arange(8192.0)).flip(-1), -1).flip(-1)  # the tempting formula
    assert not torch.isfinite(trick).all()
    assert torch.isfinite(discounted_cumsum(x, 0.95)).all()


def test_per_row_gamma_matches_each_row_scanned_alone():
    x = torch.rand(5, 300)
    gamma = torch.tensor([0.0, 0.3, 0.9, 0.99, 1.0])
    y = discounted_cumsum(x, gamma)
    for i in range(5):
        torch.testing.assert_close(y[i : i + 1], discounted_cumsum(x[i : i + 1], float(gamma[i])))


def test_signed_inputs_match_in_norm():
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(1))
    y = discounted_cumsum(x, 0.999)
    ref = discounted_cumsum_reference(x, 0.999)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_gradient_matches_finite_differences():
    x = torch.rand(3, 150, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: discounted_cumsum(t, 0.9), (x,))
    gamma = torch.tensor([0.2, 0.95, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: discounted_cumsum(t, gamma), (x,))


# bfloat16 keeps 8 significant bits, so rounding a result to bfloat16 moves it by at most 2**-8 (≈3.9e-3) relative.
# Scanning in float32 adds ≤1e-5 (test above) before that rounding; scanning in bfloat16 itself rounds at every
# step and reaches ≈1e-2 on 2048 positions.
BF16_RTOL = 2**-8 + 2e-5


@pytest.mark.parametrize("gamma", [0.95, 0.999])
def test_bfloat16_input_is_scanned_in_float32_and_only_the_result_is_rounded(gamma):
    x = (torch.rand(16, 2048, generator=torch.Generator().manual_seed(2)) + 1e-3).bfloat16()
    y = discounted_cumsum(x, gamma)
    assert y.dtype == torch.bfloat16
    # The float64 loop on the very same bfloat16 values: only the scan's own error is measured.
    assert max_relative_error(y, discounted_cumsum_reference(x, gamma)) <= BF16_RTOL


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="gamma must lie in"):
        discounted_cumsum(torch.rand(2, 4), bad)


def test_gamma_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        discounted_cumsum(torch.rand(2, 4), torch.tensor([0.5, 0.5, 0.5]))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        discounted_cumsum(torch.rand(2, 4), 0.5, backend="cuda-magic")


@pytest.mark.skipif(kernel_available(), reason="the optional kernel is installed here")
def test_kernel_backend_without_the_extension_says_how_to_install_it():
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        discounted_cumsum(torch.rand(2, 4), 0.5, backend="kernel")


@pytest.mark.skipif(not kernel_available(), reason="optional extra 'kernels' not installed")
@pytest.mark.parametrize("gamma", GAMMAS)
def test_kernel_wrapper_matches_own_scan_with_scalar_gamma_and_many_rows(gamma):
    # The kernel runs a sequential float32 loop, whose rounding grows with K (≈1e-5 at
    # K=2048, γ=0.999), so the comparison allows 1e-4; the scalar-gamma bug gave inf.
    x = torch.rand(64, 2048) + 1e-3
    torch.testing.assert_close(
        discounted_cumsum(x, gamma, backend="kernel"), discounted_cumsum(x, gamma), rtol=1e-4, atol=0
    )


@pytest.mark.skipif(not kernel_available(), reason="optional extra 'kernels' not installed")
def test_kernel_wrapper_handles_bfloat16_and_per_row_gamma():
    x = torch.rand(8, 300) + 1e-3
    gamma = torch.linspace(0, 1, 8)
    y = discounted_cumsum(x.bfloat16(), gamma, backend="kernel")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), discounted_cumsum(x.bfloat16(), gamma).float(), rtol=1e-2, atol=0)
