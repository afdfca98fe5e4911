"""The representation measures on cases with known answers."""

import math

import torch

from minibert.embeddings import alignment, knn_accuracy, pca_2d, uniformity


def test_alignment_is_zero_for_collapsed_classes():
    z = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])
    assert alignment(z, torch.tensor([0, 0, 1, 1])) == 0


def test_uniformity_of_two_antipodal_points():
    # One pair at squared distance 4: log exp(-2 · 4) = -8.
    assert math.isclose(uniformity(torch.tensor([[1.0, 0], [-1.0, 0]])), -8.0, abs_tol=1e-5)


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
