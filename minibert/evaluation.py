"""Loss and accuracy of a classifier on an encoded split."""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .losses import supcon_loss

PAPER_BATCH = 16  # the paper's "loss" is a sum over test batches of 16 of each batch's mean


@torch.no_grad()
def predict(model, encoded, device, autocast=nullcontext, batch_size=256):
    """→ logits (N, n_labels) in fp32, in the split's order. Rows are processed sorted by length
    so that each batch pads little; the order is restored at the end."""
    was_training = model.training
    model.eval()
    order = torch.argsort(encoded.lengths)
    logits = torch.empty(len(encoded), 0)
    for index in order.split(batch_size):
        input_ids, attention_mask, _ = encoded.batch(index)
        with autocast():
            out = model(input_ids.to(device), attention_mask.to(device))
        if logits.shape[1] == 0:
            logits = torch.empty(len(encoded), out.shape[1])
        logits[index] = out.float().cpu()
    model.train(was_training)
    return logits


def metrics(logits, labels):
    """The per-example mean loss, the paper's summed form, and accuracy."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    paper_sum = sum(chunk.mean().item() for chunk in losses.split(PAPER_BATCH))
    return {
        "loss": losses.mean().item(),
        "loss_paper_sum": paper_sum,
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "n": len(labels),
        "n_batches": math.ceil(len(labels) / PAPER_BATCH),
    }


def evaluate(model, encoded, device, autocast=nullcontext):
    return metrics(predict(model, encoded, device, autocast), encoded.labels)


def per_label_accuracy(logits, labels, names):
    predicted = logits.argmax(1)
    return {name: (predicted[labels == i] == i).float().mean().item()
            for i, name in enumerate(names) if (labels == i).any()}


def confused_pairs(logits, labels, names, top=5):
    """The most frequent (true → predicted) mistakes."""
    predicted = logits.argmax(1)
    counts = torch.zeros(len(names), len(names), dtype=torch.long)
    counts.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    counts.fill_diagonal_(0)
    values, flat = counts.flatten().topk(min(top, counts.numel()))
    return [{"true": names[i // len(names)], "predicted": names[i % len(names)], "count": int(v)}
            for v, i in zip(values.tolist(), flat.tolist()) if v > 0]


@torch.no_grad()
def contrastive_metrics(contrastive, encoded, device, labelled, temperature):
    """A contrastive stage's loss on a split, as the paper reports it for its SupCon and SimCLR
    rows: batches of 16 in the split's order, two dropout views of each sentence (dropout on, as
    in training), SupCon with the labels or SimCLR without; fp32. Seed the global generator
    first for a repeatable figure."""
    was_training = contrastive.training
    contrastive.train()
    losses = []
    for index in torch.arange(len(encoded)).split(PAPER_BATCH):
        input_ids, attention_mask, labels = (t.to(device) for t in encoded.batch(index))
        views = contrastive.views(input_ids, attention_mask)  # (B, 2, H)
        losses.append(supcon_loss(views, labels if labelled else None, temperature, temperature).item())
    contrastive.train(was_training)
    return {"loss": sum(losses) / len(losses), "loss_paper_sum": sum(losses), "n_batches": len(losses)}
