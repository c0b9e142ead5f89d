"""TERM against a direct high-precision evaluation of (1/t) log((1/N) sum exp(t l_i))."""
import mpmath
import numpy as np
import pytest
import torch

from ssae_common.sae.term import group_means, solve_tilt, tilted_loss, tilt_weights, weight_concentration

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


# --- the tilt solved for an effective sample size (--tilt-ess) ----------------------------------------
def ess_f64(losses: np.ndarray, t: np.ndarray) -> np.ndarray:
    """ESS(t) = (sum w)^2 / sum w^2 of w = exp(t l), for each t, in float64."""
    a = np.outer(t, losses - losses.max())
    w = np.exp(a)
    return w.sum(1) ** 2 / (w ** 2).sum(1)


def brute_force_tilt(losses: np.ndarray, fraction: float) -> float:
    """The t with ESS(t) = fraction * N, by a dense float64 grid of 4,001 log-spaced t from 1e-6 to 1e9, then
    a second one between the two points that bracket the crossing."""
    target = fraction * len(losses)
    lo, hi = 1e-6, 1e9
    for _ in range(2):
        grid = np.geomspace(lo, hi, 4001)
        ess = ess_f64(losses, grid)
        k = int(np.flatnonzero(ess >= target)[-1])
        lo, hi = grid[k], grid[k + 1]
    return float(np.sqrt(lo * hi))


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.1, 0.01, 0.002])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 50.0])
def test_solved_tilt_matches_a_brute_force_search_at_every_scale(fraction, scale):
    values = losses_f32(n=1024, seed=4, scale=scale)
    t = solve_tilt(torch.tensor(values), fraction)
    assert t.dim() == 0 and t.dtype == torch.float32
    ref = brute_force_tilt(values.astype(np.float64), fraction)
    assert float(t) == pytest.approx(ref, rel=2e-3)
    assert float(t) * scale == pytest.approx(float(solve_tilt(torch.tensor(losses_f32(n=1024, seed=4)), fraction)),
                                             rel=2e-3)  # scale-free: t scales as 1 / loss scale
    got = weight_concentration(torch.tensor(values), t)["ess_fraction"]
    assert got == pytest.approx(fraction, rel=2e-3)


def test_solved_tilt_edge_cases():
    values = torch.tensor(losses_f32())
    assert float(solve_tilt(values, 1.0)) == 0.0  # F = 1 is ERM
    assert float(solve_tilt(torch.full((100,), 0.3), 0.1)) == 0.0  # equal losses: uniform whatever t
    ties = torch.cat([torch.full((10,), 2.0), torch.linspace(0, 1, 90)])
    t = solve_tilt(ties, 0.01)  # 1 token's worth is out of reach: 10 tie at the top
    assert float(t) > 1e3 and weight_concentration(ties, t)["ess_fraction"] == pytest.approx(0.1, rel=1e-4)


def test_tensor_tilt_gives_the_same_loss_and_gradient_as_a_number():
    values = losses_f32(n=513, seed=5)
    for t in (1e-4, 0.7, 40.0):
        outs = []
        for tilt in (t, torch.tensor(t)):
            x = torch.tensor(values, requires_grad=True)
            out = tilted_loss(x, tilt)
            out.backward()
            outs.append((float(out), x.grad.numpy().copy()))
        assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
        np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-9)
    x = torch.tensor(values)
    assert float(tilted_loss(x, torch.tensor(0.0))) == pytest.approx(float(x.mean()), rel=1e-7)


# --- the tilt over token types (--tilt-groups token) --------------------------------------------------
def test_group_means_match_a_loop():
    g = np.random.default_rng(6)
    values, ids = g.random(300).astype(np.float32), g.integers(0, 40, 300)
    got = group_means(torch.tensor(values), torch.tensor(ids)).numpy()
    want = np.array([values[ids == i].mean() for i in ids])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 2.0, 30.0, 1e6])
def test_group_weights_match_hierarchical_term(t):
    """d R / d l_i for R = tilted_loss(group_means(l)) against the hierarchical TERM weights written out:
    type g gets W_g = n_g exp(t L_g) / sum_h n_h exp(t L_h), spread evenly over its n_g tokens."""
    g = np.random.default_rng(7)
    ids = np.concatenate([np.zeros(200, int), g.integers(1, 30, 300), [99]])  # a frequent type, a singleton
    values = losses_f32(n=len(ids), seed=8)
    x = torch.tensor(values, requires_grad=True)
    out = tilted_loss(group_means(x, torch.tensor(ids)), t)
    out.backward()
    types = np.unique(ids)
    n_g = np.array([(ids == v).sum() for v in types], float)
    L_g = np.array([values[ids == v].astype(np.float64).mean() for v in types])
    logits = np.log(n_g) + t * (L_g - L_g.max())
    W = np.exp(logits - logits.max())
    W /= W.sum()
    per_token = (W / n_g)[np.searchsorted(types, ids)]
    np.testing.assert_allclose(x.grad.numpy(), per_token, rtol=2e-4, atol=1e-9)
    value = (n_g * L_g).sum() / len(ids) if t == 0 else (np.log((n_g / len(ids) * np.exp(t * (L_g - L_g.max()))).sum()) / t
                                       + L_g.max())
    assert float(out) == pytest.approx(value, rel=1e-5)
    if t == 0:  # counted by size, types give back ERM
        np.testing.assert_allclose(x.grad.numpy(), 1 / len(ids), rtol=1e-5)
