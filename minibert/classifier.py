"""The paper's scenario model: the [CLS] vector of the encoder (or the mean of its word-pieces),
dropout, a small MLP head; and the projection model of the contrastive stage."""

import torch
from torch import nn


def sentence_vector(hidden, attention_mask, pooling):
    """(B, T, H) hidden states → (B, H) sentence vectors: the [CLS] position, or the mean over the
    sentence's own positions (padding left out), summed in fp32. An all-padding row (the fast
    path's filler) gets a zero vector, not 0/0."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be cls or mean, not {pooling!r}")
    if attention_mask is None:  # an unpadded batch: every position is a word-piece
        return hidden.mean(1)
    mask = attention_mask[:, :, None].float()  # (B, T, 1)
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).to(hidden.dtype)


class ScenarioClassifier(nn.Module):
    """encoder → last_hidden_state[:, 0] (or, with pooling "mean", its mean) → Dropout(drop_rate)
    → Linear(H, hidden_dim) → ReLU → Linear(hidden_dim, n_labels). The paper's defaults:
    drop_rate 0.9, hidden_dim 10, pooling "cls".

    With `groups` (one label index per output), the head predicts finer classes, MASSIVE's
    intents, and a label's probability is the sum of its classes' probabilities:
    its logit is the logsumexp of theirs, since softmax(logsumexp) = Σ softmax."""

    def __init__(self, encoder, n_labels, hidden_dim=10, drop_rate=0.9, groups=None, pooling="cls"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        if encoder.pooler is not None:
            # The paper's model reads the [CLS] hidden state, not the pooled output: the pooler
            # gets no gradient, so it is frozen rather than handed to the optimizer.
            encoder.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Sequential(
            nn.Linear(encoder.config.hidden_size, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, n_labels if groups is None else len(groups)),
        )
        self.groups = None
        if groups is not None:
            groups = torch.as_tensor(groups)
            if groups.min() < 0 or groups.max() >= n_labels:
                raise ValueError(f"groups name labels outside 0..{n_labels - 1}")
            # (n_labels, n_outputs): which outputs add up to each label. A buffer, not a weight:
            # it is rebuilt from model.json, never trained or saved.
            self.register_buffer("members", groups[None, :] == torch.arange(n_labels)[:, None], persistent=False)
            self.groups = groups.tolist()

    def embed(self, input_ids, attention_mask=None):
        """The sentence vector, (B, T) → (B, H): what the head sees before dropout."""
        return sentence_vector(self.encoder(input_ids, attention_mask), attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask=None, grouped=True):
        """(B, T) → (B, n_labels) label logits; with grouped=False, the head's own outputs (one per
        intent with `groups`, not yet summed into labels)."""
        logits = self.head(self.dropout(self.embed(input_ids, attention_mask)))
        return self.coarse(logits) if grouped else logits

    def coarse(self, logits):
        """The head's outputs → label logits (B, n_labels): unchanged without groups."""
        if self.groups is None:
            return logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 sums in fp32
        # A label without members gets the lowest float: probability 0, and no NaN gradient.
        grouped = logits[:, None, :].masked_fill(~self.members, torch.finfo(logits.dtype).min)  # (B, labels, outputs)
        return torch.logsumexp(grouped, dim=-1)


class ContrastiveModel(nn.Module):
    """The encoder with the paper's projection head (Table 3): dropout on [CLS] (or the mean), then
    Linear(H, H) → ReLU → Linear(H, H), L2-normalised. Two passes of the same batch with
    dropout active give two views of every sentence (SimCSE, Gao et al. 2021, §3)."""

    def __init__(self, encoder, drop_rate, pooling="cls"):
        super().__init__()
        H = encoder.config.hidden_size
        self.encoder = encoder
        self.pooling = pooling  # the classifier's, so that stage 1 shapes the vector stage 2 reads
        self.dropout = nn.Dropout(drop_rate)
        self.projection = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H))

    def forward(self, input_ids, attention_mask=None):
        vectors = sentence_vector(self.encoder(input_ids, attention_mask), attention_mask, self.pooling)
        z = self.projection(self.dropout(vectors))  # (B, H)
        return nn.functional.normalize(z.float(), dim=-1)

    def views(self, input_ids, attention_mask=None):
        """(B, T) → (B, 2, H): two dropout views of each sentence, stacked for the SupCon loss."""
        return torch.stack([self(input_ids, attention_mask), self(input_ids, attention_mask)], dim=1)


def layer_groups(module, n_layers, decay):
    """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT's numbering): optimizer
    groups [{"params", "lr_scale"}] in which everything outside the encoder (the head) trains at
    the full rate, the encoder's top layer at decay, each layer below at one more factor of
    decay, and the embeddings at decay^(n_layers + 1). The loop sets lr = rate · lr_scale."""
    depth = {}  # lr_scale exponent → parameters
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if "embeddings" in parts:
            k = n_layers + 1
        elif "layers" in parts:
            k = n_layers - int(parts[parts.index("layers") + 1])
        else:
            k = 0
        depth.setdefault(k, []).append(p)
    return [{"params": params, "lr_scale": decay ** k} for k, params in sorted(depth.items())]
