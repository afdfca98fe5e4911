"""SupCon and SimCLR: the authors' formula, an independent implementation, and invariants."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minibert.losses import simclr_loss, supcon_loss
from tests import cases

# The loss is computed in float32, the references in float64. Measured: ours is within 3.5e-7
# of them, on losses of 6.7 to 8.2 (a float32 ulp there is 4.8e-7). The bugs planted in
# test_planted_bugs.py move it by 0.23 or more, and computing it in bf16 under autocast by 1e-2:
# 1e-5 has a wide margin both ways.
TOL = 1e-5


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


def nt_xent(features, temperature=0.07):
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) for two views: each of the 2B views is
    classified, by cross-entropy over the other 2B - 1, as its partner view."""
    B = len(features)
    z = F.normalize(torch.cat([features[:, 0], features[:, 1]]), dim=-1)  # (2B, D)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # (2B, 2B), no self-pair
    partner = torch.arange(2 * B).roll(B)  # view i of sentence b pairs with the other view of b
    return F.cross_entropy(logits, partner)


@pytest.fixture(scope="module")
def stored():
    return load_file(cases.REFERENCE / "supcon.safetensors")


def authors_error(stored):
    """Largest |difference| from the authors' formula (in float64), with and without labels, and
    at τ = 0.1 ≠ τ_base, where the -(τ/τ_base) factor shows."""
    f, labels = stored["features"], stored["labels"]
    exact = F.normalize(f.double(), dim=-1)
    pairs = [(supcon_loss(f, labels), authors_supcon(exact, labels)),
             (supcon_loss(f), authors_supcon(exact)),
             (supcon_loss(f, labels, temperature=0.1), authors_supcon(exact, labels, temperature=0.1))]
    return max(abs(ours.item() - reference.item()) for ours, reference in pairs)


def pml_error(stored):
    """Largest |difference| from pytorch-metric-learning's stored losses. Conventions: it takes
    flattened (N, D) embeddings and has no base_temperature (the same as τ/τ_base = 1); its
    SupConLoss also drops anchors without a positive from the mean, and its NT-Xent with one
    positive per anchor is SimCLR's loss."""
    pairs = [(supcon_loss(stored["features"], stored["labels"]), stored["pml_supcon"]),
             (simclr_loss(stored["features"]), stored["pml_ntxent"]),
             (supcon_loss(stored["single"], stored["single_labels"]), stored["pml_supcon_single"])]
    return max(abs(ours.item() - reference.item()) for ours, reference in pairs)


def test_equals_the_authors_formula(stored):
    assert authors_error(stored) <= TOL


def test_equals_pytorch_metric_learning(stored):
    assert pml_error(stored) <= TOL


def test_without_labels_is_nt_xent(stored):
    """labels=None is SimCLR: the paper's NT-Xent formula, and SupCon where every sentence has a
    label of its own (distinct, in no particular order)."""
    f = stored["features"]
    assert abs(supcon_loss(f).item() - nt_xent(f.double()).item()) <= TOL
    own_labels = torch.randperm(len(f), generator=torch.Generator().manual_seed(0)) * 7 + 3
    assert abs(supcon_loss(f, own_labels).item() - nt_xent(f.double()).item()) <= TOL


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


def autocast_error(features, labels):
    """|difference| between the loss under bf16 autocast and the loss outside it, on the same
    values (bf16 features are exact in float32). Zero when the loss runs in float32 inside."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = supcon_loss(features, labels)
    return abs(inside.item() - supcon_loss(features.float(), labels).item())


def test_fp32_inside_autocast(stored):
    """Under bf16 autocast the loss is still computed in float32: the same value as outside it,
    from float32 or bf16 features (left to autocast, similarities would be bf16: off by 1e-2)."""
    f, labels = stored["features"], stored["labels"]
    assert autocast_error(f, labels) <= TOL
    assert autocast_error(f.bfloat16(), labels) <= TOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert supcon_loss(f, labels).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_features_move_the_loss_by_their_rounding_only(stored, dtype):
    """Features as a projection head gives them under autocast. Rounding each one to bf16 or
    fp16 (relative error u = 2^-8 or 2^-11) turns each unit vector by at most u, each
    similarity by 2u, each logit by 2u/τ; a log-probability (logit minus logsumexp) moves by at
    most twice that, and so does the loss: 4u/τ, 0.22 for bf16 and 0.028 for fp16. Measured on
    these features: 2.2e-3 and 7.3e-4."""
    f, labels = stored["features"], stored["labels"]
    with torch.autocast("cpu", dtype=dtype):
        low = supcon_loss(f.to(dtype), labels)
    u = torch.finfo(dtype).eps / 2  # round to nearest: relative error at most half an ulp
    assert low.dtype == torch.float32
    # The worst case for bf16 (0.22) is looser than the 5e-2 this test held before; keep the
    # tighter of the two (measured: 2.2e-3 bf16, 7.3e-4 fp16).
    assert abs(low.item() - supcon_loss(f, labels).item()) <= min(4 * u / 0.07, 5e-2)


def false_negatives_left_out_by_hand(features, labels, temperature=0.07):
    """SimCLR with each anchor's softmax over its partner view and the views of sentences of other
    labels only, written out with loops in float64."""
    B = len(features)
    z = F.normalize(torch.cat([features[:, 0], features[:, 1]]).double(), dim=-1)  # (2B, D), view-major
    label = labels.repeat(2)
    total = 0.0
    for i in range(2 * B):
        partner = (i + B) % (2 * B)
        terms = [k for k in range(2 * B) if k != i and (k == partner or label[k] != label[i])]
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in terms)
        total += -math.log(math.exp(z[i] @ z[partner] / temperature) / denominator)
    return total / (2 * B)


def false_negative_error(stored):
    features, labels = stored["features"], stored["labels"]
    assert len(set(labels.tolist())) < len(labels)  # sentences share labels: there are false negatives to drop
    ours = simclr_loss(features, left_out=labels).item()
    return abs(ours - false_negatives_left_out_by_hand(features, labels)), abs(ours - simclr_loss(features).item())


def test_simclr_without_false_negatives_by_hand(stored):
    """The diagnostic of --simclr-negatives other-labels: every term of the softmax as written by
    hand; and it differs from SimCLR proper, whose softmax holds the same-label views too."""
    error, change = false_negative_error(stored)
    assert error <= TOL and change > 100 * TOL
