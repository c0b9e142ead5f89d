"""TERM against a direct high-precision evaluation of (1/t) log((1/N) sum exp(t l_i))."""
import mpmath
import numpy as np
import pytest
import torch

from ssae_common.sae.term import tilted_loss, tilt_weights, weight_concentration

mpmath.mp.dps = 60


def reference(losses: np.ndarray, t: float):
    """Value and gradient of the formula, evaluated term by term with 60 significant digits."""
    ls = [mpmath.mpf(float(v)) for v in losses]
    t = mpmath.mpf(t)
    terms = [mpmath.exp(t * v) for v in ls]
    total = mpmath.fsum(terms)
    value = mpmath.log(total / len(ls)) / t
    grad = [term / total for term in terms]
    return float(value), np.array([float(g) for g in grad])


def losses_f32(n=257, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 0.3, n) * scale).astype(np.float32)


@pytest.mark.parametrize("t", [1e-3, 1.0, 500.0, 1e9])
def test_value_and_gradient_match_float64_reference(t):
    values = losses_f32()
    x = torch.tensor(values, requires_grad=True)
    out = tilted_loss(x, t)
    out.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out)
    ref_value, ref_grad = reference(values, t)
    assert abs(float(out) - ref_value) <= 2e-6 * max(1.0, abs(ref_value))
    assert torch.isfinite(x.grad).all()
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=2e-4, atol=1e-7)
    assert abs(float(x.grad.sum()) - 1.0) < 1e-5


def test_tiny_tilt_is_erm_and_huge_tilt_is_max():
    values = torch.tensor(losses_f32())
    mean, top = float(values.mean()), float(values.max())
    for t in (1e-12, 1e-8, 1e-6):
        assert abs(float(tilted_loss(values, t)) - mean) <= 1e-6 * mean
    assert float(tilted_loss(values, 0.0)) == pytest.approx(mean, rel=1e-7)
    for t in (1e6, 1e9, 1e12):
        assert float(tilted_loss(values, t)) == pytest.approx(top, rel=1e-5)
    assert float(tilted_loss(values, -1e9)) == pytest.approx(float(values.min()), rel=1e-5)


def test_small_tilt_keeps_its_first_order_term():
    # R_t = mean + t/2 var + O(t^2): a naive float32 log(mean(exp(t l)))/t loses this entirely
    values = losses_f32(n=4096, seed=3)
    t = 1e-3
    ref_value, _ = reference(values, t)
    got = float(tilted_loss(torch.tensor(values), t))
    mean = float(np.mean(values.astype(np.float64)))
    assert abs(got - ref_value) < 0.05 * (ref_value - mean)


def test_large_losses_and_huge_tilt_do_not_overflow():
    values = torch.tensor([1e3, 2e3, 3e3, 2999.999], requires_grad=True)
    out = tilted_loss(values, 1e9)
    out.backward()
    assert torch.isfinite(out) and float(out) == pytest.approx(3000.0, rel=1e-6)
    assert torch.isfinite(values.grad).all()
    assert float(values.grad[2]) == pytest.approx(1.0, abs=1e-6)


def test_weight_concentration():
    values = torch.tensor(losses_f32())
    erm = weight_concentration(values, 0.0)
    assert erm["ess_fraction"] == pytest.approx(1.0) and erm["max_weight_x_n"] == pytest.approx(1.0)
    mild = weight_concentration(values, 1.0)
    assert 0.3 < mild["ess_fraction"] < 1.0
    extreme = weight_concentration(values, 1e9)
    assert extreme["ess_fraction"] == pytest.approx(1 / len(values), rel=1e-3)
    assert extreme["max_weight_x_n"] == pytest.approx(len(values), rel=1e-3)
    w = tilt_weights(values, 500.0)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
