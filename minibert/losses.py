"""The supervised contrastive loss (Khosla et al. 2020, eq. 2, "L_out"), and SimCLR's NT-Xent
(Chen et al. 2020) as its special case without labels.

features: (B, V, D), V views of each of B sentences (here: SimCSE's two dropout passes).
Features are L2-normalised inside, so raw projections may be passed; normalising twice is a no-op.
"""

import torch
import torch.nn.functional as F


def supcon_loss(features, labels=None, temperature=0.07, base_temperature=0.07, left_out=None):
    """Mean over anchors of -(τ/τ_base) · mean over the anchor's positives of log p(positive).

    With labels, positives are all other views of sentences with the same label; with
    labels=None, only the other views of the same sentence (SimCLR / NT-Xent). An anchor with
    no positive has nothing to pull towards: it is left out of the mean, and a batch where no
    anchor has one gives a loss of zero (with zero, finite gradients), never NaN.

    `left_out` (B,), a diagnostic: the views of other sentences that share the anchor's `left_out`
    id are left out of its softmax, neither positive nor negative (SimCLR without the false
    negatives its labels would name).
    """
    # Similarities and softmax in fp32: 1/τ ≈ 14 amplifies rounding. Casting the features is not
    # enough under autocast, which would recast the matmul below to bf16/fp16 (and with it the
    # logits and the log-softmax), so autocast is off for the whole body.
    with torch.autocast(features.device.type, enabled=False):
        B, V, D = features.shape
        z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(V * B, D)  # (VB, D), view-major
        ids = torch.arange(B, device=features.device) if labels is None else labels.to(features.device)
        ids = ids.repeat(V)  # (VB,) the label (or sentence) of each row
        logits = z @ z.T / temperature  # (VB, VB)
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # for exp's range only
        not_self = ~torch.eye(V * B, dtype=torch.bool, device=features.device)
        positive = (ids[:, None] == ids[None, :]) & not_self
        counted = not_self  # the softmax's terms: every other view, or fewer with `left_out`
        if left_out is not None:
            hidden = left_out.to(features.device).repeat(V)
            counted = not_self & ((hidden[:, None] != hidden[None, :]) | positive)
        log_prob = logits - torch.logsumexp(logits.masked_fill(~counted, float("-inf")), dim=1, keepdim=True)
        n_pos = positive.sum(1)
        has_pos = n_pos > 0
        # where(), not a product: a masked-out entry may be ±inf and inf·0 is NaN.
        mean_log_prob_pos = torch.where(positive, log_prob, 0.0).sum(1) / n_pos.clamp(min=1)  # (VB,)
        loss = -(temperature / base_temperature) * mean_log_prob_pos
        # Mean over the anchors that have a positive; computed without a host sync, so a GPU step
        # never waits, and 0 (still attached to the graph) when none has one.
        return torch.where(has_pos, loss, 0.0).sum() / has_pos.sum().clamp(min=1)


def simclr_loss(features, temperature=0.07, left_out=None):
    return supcon_loss(features, labels=None, temperature=temperature, base_temperature=temperature, left_out=left_out)


def symmetric_kl(first, second):
    """R-Drop's consistency term (Liang et al. 2021, eq. 2): (KL(P1‖P2) + KL(P2‖P1)) / 2 between
    the softmaxes of two dropout passes' logits (B, C), summed over the batch; in fp32 at least."""
    with torch.autocast(first.device.type, enabled=False):
        dtype = torch.promote_types(first.dtype, torch.float32)
        p, q = F.log_softmax(first.to(dtype), dim=-1), F.log_softmax(second.to(dtype), dim=-1)
        return 0.5 * ((p.exp() * (p - q)).sum() + (q.exp() * (q - p)).sum())
