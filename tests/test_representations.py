"""The representation measures on cases with known answers, and against plain float64 loops on
cases where a wrong formula shows: classes that are not collapsed (a self-pair, at distance 0,
then pulls alignment down), many pairs (a sum, not a mean, then shifts uniformity by the log of
their count), and points far from the origin (PCA without centring then finds the offset).
test_planted_bugs_evaluation.py shows each comparison fails for its bug."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from minibert import representations
from minibert.representations import alignment, knn_accuracy, pca_2d, uniformity

# The measures run in float32 on unit vectors: a mean of squared distances (at most 4) is off
# the float64 loops by a few float32 ulps (measured: 1e-8 and 3e-8). The bugs move them far more:
# the self-pairs counted (4 points a class, 16 pairs in place of 12) take a quarter off the
# alignment, and a sum over the 66 pairs adds log(66) = 4.2 to the uniformity.
MEASURE_TOL = 1e-5


def unit_rows(z):
    """Each row of z divided by its length, in float64, by hand."""
    rows = []
    for row in z.double().tolist():
        norm = math.sqrt(sum(x * x for x in row))
        rows.append([x / norm for x in row])
    return rows


def squared_distance(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def spread_classes():
    """12 points in 5-D, three classes of 4 points each around their own centre, spread enough
    that no two points of a class coincide on the sphere."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(4)
    return 2.0 * F.one_hot(labels, 5) + torch.randn(12, 5, generator=g), labels


def alignment_error():
    """Relative |difference| between alignment and the mean over the ordered pairs (i, j),
    i ≠ j, of one label of ||z_i - z_j||², by hand."""
    z, labels = spread_classes()
    unit = unit_rows(z)
    pairs = [squared_distance(unit[i], unit[j]) for i in range(len(unit)) for j in range(len(unit))
             if i != j and labels[i] == labels[j]]
    by_hand = sum(pairs) / len(pairs)
    return abs(representations.alignment(z, labels) - by_hand) / by_hand


def uniformity_error():
    """|difference| between uniformity and log of the mean over the pairs i < j of
    exp(-2 ||z_i - z_j||²), by hand."""
    z, _ = spread_classes()
    unit = unit_rows(z)
    terms = [math.exp(-2 * squared_distance(unit[i], unit[j])) for i in range(len(unit)) for j in range(i)]
    return abs(representations.uniformity(z) - math.log(sum(terms) / len(terms)))


def offset_cloud():
    """200 points in 5-D, wide along the first axis, then the fourth, and far from the origin:
    the offset (length ~72) is longer than the widest spread (std 10)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([10.0, 0.1, 0.1, 3.0, 0.1])
    return torch.randn(200, 5, generator=g) * scale + torch.tensor([50.0, -30.0, 20.0, 40.0, 10.0])


def pca_error():
    """Largest |difference|, relative to the widest coordinate, between pca_2d and the centred
    points projected on the two top eigenvectors of their covariance (numpy's eigh in float64,
    not torch's SVD), each axis up to its sign."""
    z = offset_cloud()
    x = z.double().numpy()
    centred = x - x.mean(0)
    _, eigenvectors = np.linalg.eigh(centred.T @ centred / (len(x) - 1))  # ascending
    expected = centred @ eigenvectors[:, [-1, -2]]  # (N, 2)
    points = representations.pca_2d(z).double().numpy()
    signs = np.sign((points * expected).sum(0))  # an eigenvector's sign is arbitrary
    return np.abs(points * signs - expected).max() / np.abs(expected).max()


# A float32 SVD of points ~10 wide puts each coordinate within ~1e-6 of the float64 projection
# (measured: 2e-7 relative). Left uncentred, the first axis is the offset's direction: off by the
# offset itself, ~1 relative.
PCA_TOL = 1e-4


def test_alignment_is_zero_for_collapsed_classes():
    z = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])
    assert alignment(z, torch.tensor([0, 0, 1, 1])) == 0


def test_alignment_averages_distinct_same_label_pairs():
    assert alignment_error() < MEASURE_TOL


def test_uniformity_of_two_antipodal_points():
    # One pair at squared distance 4: log exp(-2 · 4) = -8.
    assert math.isclose(uniformity(torch.tensor([[1.0, 0], [-1.0, 0]])), -8.0, abs_tol=1e-5)


def test_uniformity_is_the_log_of_a_mean_over_pairs():
    assert uniformity_error() < MEASURE_TOL


def test_knn_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(20)
    train = centres[labels] + torch.randn(60, 3, generator=g)
    test = centres[labels] + torch.randn(60, 3, generator=g)
    assert knn_accuracy(train, labels, test, labels, k=5) == 1.0


def test_pca_keeps_the_widest_direction():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 0.1, 0.1, 3.0, 0.1])
    points = pca_2d(z)
    assert points.shape == (200, 2)
    assert points[:, 0].var() > points[:, 1].var() > 1


def test_pca_projects_the_centred_points():
    assert pca_error() < PCA_TOL
    points = pca_2d(offset_cloud())
    assert points.double().mean(0).abs().max() < 1e-4  # centred, far from the cloud's offset of ~72
