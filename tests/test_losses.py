"""SupCon and SimCLR: the authors' formula, an independent implementation, and invariants."""

import pytest
import torch
from safetensors.torch import load_file

from minibert.losses import simclr_loss, supcon_loss
from tests import cases


def authors_supcon(features, labels=None, temperature=0.07, base_temperature=0.07):
    """SupConLoss of Khosla et al.'s reference code (contrast_mode 'all'), transcribed as a
    formula: valid when every anchor has a positive."""
    B, V, _ = features.shape
    mask = torch.eye(B) if labels is None else (labels[:, None] == labels[None, :]).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    logits_mask = 1 - torch.eye(B * V)
    mask = mask.repeat(V, V) * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


@pytest.fixture(scope="module")
def stored():
    return load_file(cases.REFERENCE / "supcon.safetensors")


def test_equals_the_authors_formula(stored):
    f, labels = stored["features"], stored["labels"]
    assert supcon_loss(f, labels) == pytest.approx(authors_supcon(f, labels).item(), abs=1e-6)
    assert supcon_loss(f) == pytest.approx(authors_supcon(f).item(), abs=1e-6)
    assert supcon_loss(f, labels, temperature=0.1) == pytest.approx(
        authors_supcon(f, labels, temperature=0.1).item(), abs=1e-6)


def test_equals_pytorch_metric_learning(stored):
    # Conventions: pytorch-metric-learning takes flattened (N, D) embeddings and has no
    # base_temperature (the same as τ/τ_base = 1); its SupConLoss also drops anchors without a
    # positive from the mean, and its NT-Xent with one positive per anchor is SimCLR's loss.
    assert supcon_loss(stored["features"], stored["labels"]) == pytest.approx(stored["pml_supcon"].item(), abs=1e-5)
    assert simclr_loss(stored["features"]) == pytest.approx(stored["pml_ntxent"].item(), abs=1e-5)
    assert supcon_loss(stored["single"], stored["single_labels"]) == pytest.approx(
        stored["pml_supcon_single"].item(), abs=1e-5)


def test_no_labels_is_labels_arange(stored):
    f = stored["features"]
    assert supcon_loss(f) == pytest.approx(supcon_loss(f, torch.arange(len(f))).item(), abs=1e-7)


def test_permuting_the_batch_changes_nothing(stored):
    f, labels = stored["features"], stored["labels"]
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))
    assert supcon_loss(f[perm], labels[perm]) == pytest.approx(supcon_loss(f, labels).item(), abs=1e-6)


def test_normalises_inside(stored):
    f = stored["features"]
    assert supcon_loss(3.5 * f) == pytest.approx(supcon_loss(f).item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batch_without_positives_is_finite(dtype):
    features = torch.randn(6, 1, 8, dtype=dtype, requires_grad=True)
    loss = supcon_loss(features, torch.arange(6))  # one view, all labels distinct: no positive anywhere
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(features.grad).all()
    partial = torch.randn(6, 1, 8, dtype=dtype, requires_grad=True)
    loss = supcon_loss(partial, torch.tensor([0, 0, 1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(partial.grad).all() and partial.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_inside_under_reduced_precision(stored, dtype):
    f, labels = stored["features"], stored["labels"]
    low = supcon_loss(f.to(dtype), labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(supcon_loss(f, labels).item(), abs=5e-2)
