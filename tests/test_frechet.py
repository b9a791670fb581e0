"""Frechet distance (FID's formula) against scipy's sqrtm and closed forms."""

import numpy as np
import pytest
import scipy.linalg

from codi_jax.evaluation import frechet


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 4, 32])
def test_matches_scipy_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_closed_forms():
    # Diagonal covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    # A distribution against itself: 0 (also with a singular covariance).
    s = np.diag([1.0, 0.0, 2.0])
    assert frechet.frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-12)


def test_from_samples_converges_to_the_population_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(0.5, 2.0, size=(20000, 3))
    expected = 3 * (0.5**2 + (2.0 - 1.0) ** 2)
    assert frechet.frechet_distance_of_features(a, b) == pytest.approx(expected, rel=0.03)


def test_bad_shapes():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"features must be \[N >= 2, D\]"):
        frechet.gaussian_stats(np.zeros((1, 4)))
