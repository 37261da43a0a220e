"""Fréchet distance between Gaussians fitted to features (FID and FID-like scores).

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

computed in float64 with numpy/scipy as the reference FID implementations do (pytorch-fid's
`calculate_frechet_distance`, itself from the original TensorFlow code): the matrix square root
by `scipy.linalg.sqrtm`; if it is not finite (S1 S2 nearly singular), eps * I is added to both
covariances and it is taken again; an imaginary part left by rounding is dropped when the
diagonal's is below 1e-3, and is an error otherwise.

`fid_from_features` gives the same distance for N sample features [N, D] against reference
statistics; when N <= D (a few hundred samples of 2048 Inception features) it takes the trace
term from an N x N eigenproblem instead of the D x D square root (exact: the nonzero eigenvalues
of S1 S2 = Xc^T Xc S2 / (N - 1) are those of Xc S2 Xc^T / (N - 1), symmetric positive
semi-definite), seconds instead of most of a minute on a CPU.

Statistics are the mean and the unbiased covariance (N - 1 normalisation, like `np.cov`).
`RunningStats` accumulates them batch by batch, so 50k feature vectors never sit in memory at
once.
"""

import numpy as np
import scipy.linalg
from absl import logging

EPS = 1e-6
"""Added to both covariances' diagonals when the product is too singular for sqrtm."""

_IMAGINARY_TOLERANCE = 1e-3


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: expected a mean [D] and a covariance [D, D]; got shapes {mu.shape} and "
            f"{sigma.shape}."
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{name}: the mean or covariance holds NaN or infinite values.")


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = EPS
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: [D] means (any float dtype; computed in float64).
      sigma1, sigma2: [D, D] symmetric positive semi-definite covariances.
      eps: diagonal offset used only when sqrtm(sigma1 @ sigma2) is not finite.

    Returns:
      The distance as a Python float (>= 0 up to rounding; FID is this value).

    Raises:
      ValueError: for mismatched or malformed shapes, non-finite inputs, or a square root with a
        significant imaginary part (the covariances are not valid).
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two statistics have different feature dimensions: {mu1.shape[0]} and "
            f"{mu2.shape[0]}; were they computed with the same feature network?"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        logging.warning(
            "Fréchet distance: sigma1 @ sigma2 is nearly singular; adding %g to the diagonals.", eps
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=_IMAGINARY_TOLERANCE):
            raise ValueError(
                "Fréchet distance: the square root of sigma1 @ sigma2 has an imaginary part of up "
                f"to {np.max(np.abs(covmean.imag)):.3g}; the covariances are not positive "
                "semi-definite (too few samples for the feature dimension?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(
    features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = EPS
) -> float:
    """`fid_from_stats(*stats_from_features(features), mu2, sigma2)`, through an N x N
    eigenproblem when the N samples are at most the feature dimension D (see the module
    docstring), else through the statistics.

    Args:
      features: [N, D] sample features, N >= 2 (any float dtype; computed in float64).
      mu2, sigma2: the reference mean [D] and covariance [D, D].
      eps: as `fid_from_stats` (the N > D path only).

    Raises:
      ValueError: malformed shapes, non-finite values, or a reference covariance that is not
        positive semi-definite.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 samples; got shape {x.shape}.")
    n, d = x.shape
    if n > d:
        return fid_from_stats(*stats_from_features(x), mu2, sigma2, eps)
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu2, sigma2, "reference statistics")
    if mu2.shape[0] != d:
        raise ValueError(
            f"the features have dimension {d} and the reference statistics {mu2.shape[0]}; were "
            "they computed with the same feature network?"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("the features hold NaN or infinite values.")
    mu1 = x.mean(axis=0)
    centred = x - mu1
    product = centred @ sigma2 @ centred.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    if eigenvalues.min() < -1e-6 * max(eigenvalues.max(), 1e-12):
        raise ValueError(
            f"Fréchet distance: Xc S2 Xc^T has a negative eigenvalue {eigenvalues.min():.3g}; "
            "the reference covariance is not positive semi-definite."
        )
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    trace1 = float(np.sum(centred * centred) / (n - 1))
    diff = mu1 - mu2
    return float(diff @ diff + trace1 + np.trace(sigma2) - 2.0 * trace_covmean)


def stats_from_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"features must be [N, D] with N >= 2 samples; got shape {features.shape}."
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Keeps the count, the sum and the sum of outer products of the features minus a shift (the
    first batch's mean), so memory is O(D^2) however many samples pass through, and the
    subtraction that forms the covariance does not cancel catastrophically when the mean is
    large. `mean` and `covariance` equal `stats_from_features` of all features seen (to
    rounding).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1; got {dim!r}.")
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features [N, D] (any float dtype, e.g. a device array)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"expected a batch of features [N, {self.dim}]; got shape {features.shape}."
            )
        if features.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = features.mean(axis=0)
        centred = features - self._shift
        self.count += features.shape[0]
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred

    @property
    def mean(self) -> np.ndarray:
        """[D] float64 mean of all features seen."""
        self._require(1)
        return self._shift + self._sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """[D, D] float64 unbiased covariance (N - 1 normalisation) of all features seen."""
        self._require(2)
        centred_mean = self._sum / self.count
        scatter = self._outer - self.count * np.outer(centred_mean, centred_mean)
        return scatter / (self.count - 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance), as `stats_from_features` returns them."""
        return self.mean, self.covariance

    def _require(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"need at least {n} feature vectors; only {self.count} seen so far.")
