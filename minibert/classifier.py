"""The paper's scenario model: the [CLS] vector of the encoder, dropout, a small MLP head."""

import torch
from torch import nn


class ScenarioClassifier(nn.Module):
    """encoder → last_hidden_state[:, 0] → Dropout(drop_rate) → Linear(H, hidden_dim) → ReLU
    → Linear(hidden_dim, n_labels). The paper's defaults: drop_rate 0.9, hidden_dim 10."""

    def __init__(self, encoder, n_labels, hidden_dim=10, drop_rate=0.9):
        super().__init__()
        self.encoder = encoder
        if encoder.pooler is not None:
            # The paper's model reads the [CLS] hidden state, not the pooled output: the pooler
            # gets no gradient, so it is frozen rather than handed to the optimizer.
            encoder.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Sequential(
            nn.Linear(encoder.config.hidden_size, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, n_labels),
        )

    def embed(self, input_ids, attention_mask=None):
        """The [CLS] vector, (B, T) → (B, H): what the head sees before dropout."""
        return self.encoder(input_ids, attention_mask)[:, 0]

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))  # (B, n_labels)


class ContrastiveModel(nn.Module):
    """The encoder with the paper's projection head (Table 3): dropout on [CLS], then
    Linear(H, H) → ReLU → Linear(H, H), L2-normalised. Two passes of the same batch with
    dropout active give two views of every sentence (SimCSE, Gao et al. 2021, §3)."""

    def __init__(self, encoder, drop_rate=0.1):
        super().__init__()
        H = encoder.config.hidden_size
        self.encoder = encoder
        self.dropout = nn.Dropout(drop_rate)
        self.projection = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H))

    def forward(self, input_ids, attention_mask=None):
        z = self.projection(self.dropout(self.encoder(input_ids, attention_mask)[:, 0]))  # (B, H)
        return nn.functional.normalize(z.float(), dim=-1)

    def views(self, input_ids, attention_mask=None):
        """(B, T) → (B, 2, H): two dropout views of each sentence, stacked for the SupCon loss."""
        return torch.stack([self(input_ids, attention_mask), self(input_ids, attention_mask)], dim=1)
