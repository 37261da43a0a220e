"""Kernel Inception Distance (KID): the unbiased squared MMD between two feature sets.

    KID = MMD_u^2(X, Y) with the cubic polynomial kernel k(x, y) = (x . y / D + 1)^3

(Binkowski et al. 2018, "Demystifying MMD GANs"). Unlike FID, whose estimate from N samples is
biased upwards by a term that shrinks like 1/N (so FIDs over a few hundred images are much larger
than over 50k, and their ordering can depend on N), the MMD estimator is unbiased: its expectation
does not depend on the number of samples, only its variance does. It is therefore the score to
read beside FID when an evaluation uses few images (the inpainting protocol's 160 per family).

As in the reference implementations (the paper's TensorFlow code, torch-fidelity, clean-fid):
the estimate is averaged over `num_subsets` random subsets of `subset_size` samples of each set
(drawn without replacement from a seeded generator), and the spread over subsets is reported
too. Computed in float64 with numpy.
"""

import dataclasses

import numpy as np

NUM_SUBSETS = 100
SUBSET_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class KID:
    """A KID estimate: the mean over subsets and their standard deviation."""

    mean: float
    std: float  # over subsets (of the subset estimates, not a standard error of the mean)
    subset_size: int
    num_subsets: int


def _check(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"{name}: expected features [N, D] with N >= 2; got shape {features.shape}."
        )
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name}: the features hold NaN or infinite values.")
    return features


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples [m, D] under the cubic polynomial kernel."""
    m, dim = x.shape
    if y.shape != x.shape:
        raise ValueError(f"mmd2_unbiased takes two [m, D] samples; got {x.shape} and {y.shape}.")
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = NUM_SUBSETS,
    subset_size: int = SUBSET_SIZE,
    seed: int = 0,
) -> KID:
    """KID between two feature sets [N_a, D] and [N_b, D].

    Each of `num_subsets` subsets takes min(subset_size, N_a, N_b) samples of each set without
    replacement; the result is the mean and std of the subsets' unbiased MMD^2.
    """
    a, b = _check(features_a, "first features"), _check(features_b, "second features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"the two feature sets have different dimensions: {a.shape[1]} and {b.shape[1]}; "
            "were they computed with the same feature network?"
        )
    for what, value, lo in (("num_subsets", num_subsets, 1), ("subset_size", subset_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"KID {what} must be an int >= {lo}; got {value!r}.")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, np.float64)
    for i in range(num_subsets):
        xa = a[rng.choice(a.shape[0], m, replace=False)]
        xb = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(xa, xb)
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return KID(float(values.mean()), std, m, num_subsets)
