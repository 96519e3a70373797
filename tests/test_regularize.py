"""regularize() against an independent numpy/scipy implementation of the original's rule."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from deepvis_repro.errors import DeepvisError
from deepvis_repro.optimize import PRESETS
from deepvis_repro.optvis.regularizers import gaussian_blur, regularize


def reference(x, grad, *, decay, blur_radius, blur_every, small_norm_pct, small_contrib_pct, step):
    """The original toolbox's per-image numpy code, image by image."""
    out = []
    for xi, gi in zip(x.astype(np.float64), grad.astype(np.float64)):
        xi = xi * (1 - decay)
        if blur_every and blur_radius > 0 and step % blur_every == 0:
            xi = np.stack([gaussian_filter(c, blur_radius) for c in xi])
        if small_norm_pct > 0:
            norms = np.linalg.norm(xi, axis=0)
            xi = xi * ~(norms < np.percentile(norms, small_norm_pct))
        if small_contrib_pct > 0:
            benefit = np.abs((gi * -xi).sum(0))
            xi = xi * ~(benefit < np.percentile(benefit, small_contrib_pct))
        out.append(xi)
    return np.stack(out)


@pytest.mark.parametrize("shape", [(3, 3, 9, 13), (2, 3, 31, 17), (1, 3, 224, 224)])
@pytest.mark.parametrize("name", ["paper_1", "paper_2", "paper_3", "paper_4", "none"])
@pytest.mark.parametrize("step", [0, 1, 4])
def test_regularize_matches_reference(name, shape, step):
    rng = np.random.default_rng(sum(shape) + step)
    x = rng.normal(0, 40, shape)
    grad = rng.normal(0, 1e-3, shape)
    p = PRESETS[name].regularization()
    want = reference(x, grad, step=step, **p)
    got = regularize(torch.tensor(x), torch.tensor(grad), step=step, **p).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)
    if p["small_norm_pct"] or p["small_contrib_pct"]:
        pct = max(p["small_norm_pct"], p["small_contrib_pct"])
        zeroed = (got == 0).all(1).mean()
        assert abs(zeroed - pct / 100) < 0.05  # the right share of pixels was clipped


def test_float32_batch_agrees_with_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 40, (4, 3, 40, 40)).astype(np.float32)
    grad = rng.normal(0, 1, x.shape).astype(np.float32)
    kw = dict(decay=0.01, blur_radius=1.0, blur_every=2, small_norm_pct=30, small_contrib_pct=50, step=2)
    got = regularize(torch.tensor(x), torch.tensor(grad), **kw).numpy()
    want = reference(x, grad, **kw)
    assert ((got == 0) == (want == 0)).mean() > 0.999
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("hw", [(1, 1), (2, 7), (5, 5), (17, 30)])
def test_blur_matches_scipy_at_odd_sizes_and_borders(sigma, hw):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, *hw))
    want = np.stack([[gaussian_filter(c, sigma) for c in img] for img in x])
    got = gaussian_blur(torch.tensor(x), sigma).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_blur_only_on_its_steps():
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    kw = dict(blur_radius=1.0, blur_every=4)
    assert torch.equal(regularize(x, x, step=3, **kw), x)
    assert not torch.equal(regularize(x, x, step=8, **kw), x)


@pytest.mark.parametrize("kw, msg", [
    (dict(small_norm_pct=101), "small_norm_pct must be a percentile in \\[0, 100\\]"),
    (dict(small_contrib_pct=-1), "small_contrib_pct must be a percentile"),
    (dict(decay=-0.1), "decay must be in \\[0, 1\\]"),
    (dict(blur_radius=-1.0, blur_every=2), "blur_radius and blur_every must be >= 0"),
])
def test_bad_values_are_refused(kw, msg):
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(DeepvisError, match=msg):
        regularize(x, x, **kw)


def test_table_1_presets():
    p = PRESETS
    assert set(p) == {"paper_1", "paper_2", "paper_3", "paper_4", "none", "lucid", "maco"}
    assert (p["paper_1"].decay, p["paper_1"].blur_radius, p["paper_1"].blur_every,
            p["paper_1"].small_norm_pct, p["paper_1"].lr_policy, p["paper_1"].steps) == (0, 0.5, 4, 50, "progress", 500)
    assert (p["paper_2"].decay, p["paper_2"].small_norm_pct, p["paper_2"].lr, p["paper_2"].steps) == (0.3, 20, 100, 750)
    assert (p["paper_3"].decay, p["paper_3"].blur_radius, p["paper_3"].steps) == (0.0001, 1.0, 1000)
    assert (p["paper_4"].small_contrib_pct, p["paper_4"].max_lr, p["paper_4"].steps) == (90, 1e8, 1000)
    assert p["none"].regularization() == dict(decay=0, blur_radius=0, blur_every=0,
                                             small_norm_pct=0, small_contrib_pct=0)
