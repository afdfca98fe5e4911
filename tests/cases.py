"""The cases the reference files hold, shared by the generator and the live parity tests."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parent / "reference"


@dataclass(frozen=True)
class TinyCase:
    name: str
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    batch: int
    length: int
    bert_layout: bool  # save as bert-base-uncased does: `bert.` prefix, gamma/beta, `cls.*` heads
    seed: int


TINY = [
    TinyCase("tiny_odd", 36, 3, 2, 37, 99, 5, 7, bert_layout=False, seed=0),
    TinyCase("tiny_bert_layout", 24, 2, 3, 50, 99, 4, 9, bert_layout=True, seed=1),
]

SENTENCES = [
    "wake me up at seven tomorrow",
    "what's the weather like in paris this weekend",
    "play some jazz in the kitchen",
    "olly, turn the lights off",
    "add eggs and milk to my shopping list",
    "how many calories are in an avocado",
    "remind me about the dentist appointment on friday at 3 pm",
    "send an email to kate saying i'll be late",
    "order a large pepperoni pizza from tony's for delivery",
    "what time is it in tokyo",
    "tell me a joke",
    "could you please find me the cheapest train ticket from london to edinburgh for next "
    "tuesday morning and book a seat by the window",
]


def tiny_hf_config(case):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=case.vocab_size, hidden_size=case.hidden_size,
        num_hidden_layers=case.num_hidden_layers, num_attention_heads=case.num_attention_heads,
        intermediate_size=case.intermediate_size, max_position_embeddings=16,
    )


def tiny_hf_model(case):
    """A transformers BertModel (or BertForPreTraining in the bert layout) with random weights.

    BERT initialises LayerNorms to 1/0 and biases to 0; they are randomised here so that a
    mix-up of any two parameters shows in the outputs."""
    from transformers import BertForPreTraining, BertModel

    torch.manual_seed(case.seed)
    config = tiny_hf_config(case)
    model = BertForPreTraining(config) if case.bert_layout else BertModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_encoder(model):
    return getattr(model, "bert", model)


def to_bert_base_layout(state, config):
    """Rename a BertForPreTraining state dict as the bert-base-uncased checkpoint names it."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed[key] = value
    renamed["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    return renamed


def tiny_vocab(size):
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return special + [f"w{i}" for i in range(size - len(special))]


def tiny_inputs(case):
    """Random ids, both token types, and rows padded to different lengths (one unpadded)."""
    g = torch.Generator().manual_seed(case.seed + 100)
    B, T = case.batch, case.length
    input_ids = torch.randint(5, case.vocab_size, (B, T), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    lengths = torch.tensor([T] + [int(x) for x in torch.randint(2, T, (B - 1,), generator=g)])
    attention_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    token_type_ids = torch.randint(0, 2, (B, T), generator=g) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@torch.no_grad()
def hf_outputs(model, inputs):
    out = hf_encoder(model)(**inputs)
    return {"last_hidden_state": out.last_hidden_state.contiguous(), "pooled": out.pooler_output.contiguous()}


def minilm_folder():
    from minibert.weights import WEIGHTS_DIR

    return WEIGHTS_DIR / "all-MiniLM-L6-v2"


def require_assets():
    return os.environ.get("MINIBERT_REQUIRE_ASSETS") == "1"


# Reference files beyond the encoder's: name → function returning a dict of tensors.
EXTRA_REFERENCES = {}
