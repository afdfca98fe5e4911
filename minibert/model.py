"""The BERT encoder (Devlin et al. 2019), written out in full.

Dimension legend, after google-research/bert:
    B  batch size          T  sequence length (word-pieces, [CLS] and [SEP] included)
    H  hidden size         nh number of attention heads      hs = H // nh, one head's size
    I  intermediate (feed-forward) size

Each layer is post-LayerNorm, as in the original BERT: x = LayerNorm(x + sublayer(x)).
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .lora import frozen_and_update


@dataclass(frozen=True)
class BertConfig:
    """Field names are the keys of a Hugging Face `config.json`."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: BERT uses 'gelu' (erf)")

    @classmethod
    def from_json(cls, path):
        """Read a config.json, keeping the keys this encoder uses and checking the rest fit."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a JSON config: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config.json holds a JSON object, not {type(raw).__name__}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} "
                             "is not supported (only 'absolute')")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)  # (B, T, H)
        return self.dropout(self.norm(x))


class Layer(nn.Module):
    """Multi-head self-attention, then the feed-forward block, each with residual and LayerNorm.

    `query`, `key` and `value` are separate Linear modules on purpose: LoRA finds them by name.
    With `fused_qkv` (set by the GPU's fast path, minibert/fast.py) the three run as one matrix
    product over their weights stacked: the same function in fewer, larger kernels.
    """

    def __init__(self, config):
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.attention_output = nn.Linear(H, H)
        self.attention_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(H, I)
        self.output = nn.Linear(I, H)
        self.output_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.fused_qkv = False

    def forward(self, x, attend):
        B, T, H = x.shape
        nh, hs = self.n_head, H // self.n_head
        q, k, v = (y.view(B, T, nh, hs).transpose(1, 2) for y in self.project(x))  # (B, nh, T, hs) each
        p = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p)  # (B, nh, T, hs)
        a = a.transpose(1, 2).reshape(B, T, H)  # (B, T, H), the heads side by side again
        x = self.attention_norm(x + self.dropout(self.attention_output(a)))
        h = F.gelu(self.intermediate(x))  # (B, T, I), exact erf GELU as in BERT
        return self.output_norm(x + self.dropout(self.output(h)))

    def project(self, x):
        """→ query, key and value of x, each (B, T, H)."""
        projections = (self.query, self.key, self.value)
        if not self.fused_qkv:
            return tuple(linear(x) for linear in projections)
        parts = [frozen_and_update(linear) for linear in projections]  # a LoRA projection is two parts
        weight = torch.cat([frozen.weight for frozen, _ in parts])  # (3H, H)
        bias = torch.cat([frozen.bias for frozen, _ in parts])
        qkv = F.linear(x, weight, bias).chunk(3, dim=-1)
        return tuple(y if update is None else y + update(x) for y, (_, update) in zip(qkv, parts))


class BertModel(nn.Module):
    def __init__(self, config, with_pooler=True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if with_pooler else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # BERT's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) → last hidden state (B, T, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        attend = None if attention_mask is None else attention_keys(attention_mask)
        for layer in self.layers:
            x = layer(x, attend)
        return x

    def pool(self, hidden):
        """BERT's pooled output: tanh(dense(h[:, 0])), (B, T, H) → (B, H)."""
        if self.pooler is None:
            raise RuntimeError("this model was built with with_pooler=False")
        return torch.tanh(self.pooler(hidden[:, 0]))


def attention_keys(attention_mask):
    """(B, T) 1/0 mask → boolean (B, 1, 1, T): which keys every query may attend to.

    A row that is all padding would leave its queries nothing to attend to, and softmax over
    nothing is 0/0 = NaN (in fp16 and bf16 also when a large negative bias overflows to -inf).
    Such a row carries no token, so it attends to all of its keys instead: finite, and ignored.
    Whether a batch is padded at all is the caller's to know, on the host (see Encoded.batch):
    asking the device here would make every step wait for it. Pass no mask when none is padded.
    """
    keep = attention_mask.bool()
    empty = ~keep.any(dim=1, keepdim=True)  # (B, 1)
    return (keep | empty)[:, None, None, :]


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

