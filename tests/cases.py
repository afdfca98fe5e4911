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

MAX_LEN = 20  # the paper's sentence length, at which the stored MiniLM reference was tokenized
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


@torch.no_grad()
def minibert_outputs(model, inputs):
    hidden = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    return {"last_hidden_state": hidden, "pooled": model.pool(hidden)}


# How encoder outputs are compared. Two correct implementations agree up to the rounding of
# their kernels, which depends on the CPU (SIMD width, BLAS blocking, fused multiply-adds); a bug
# moves the outputs by far more. Measured on real-token positions and the pooled output, on one
# AVX2 CPU under two kernel paths (ATen's default and AVX2 kernels, MKL's compatible and native
# paths), batched and one sentence at a time:
#
#                                   float64                     float32
#   drift between correct runs      <= 5e-14 (minibert against  <= 2.8e-6 (MiniLM against its
#                                   transformers, and across    float64 truth; 2.7e-6 was seen
#                                   kernel paths)               between two float32 runs on a
#                                                               Zen 4 AVX-512 CPU)
#   smallest planted bug            8.4e-7 (tanh GELU on a      1.4e-3 (LayerNorm eps 1e-5 on
#                                   tiny checkpoint)            MiniLM)
#
# Each tolerance sits between the two with a wide margin each way: TOL_FP64 is 2,000x the drift
# and 8,000x below the smallest bug; TOL_FP32 is 18x the drift and 27x below it. The tiny
# checkpoints are compared in float64 because their small random weights keep GELU's input near
# 0, where the tanh approximation is within 1e-6 of erf: in float32 that bug hides in the noise.
# tests/test_planted_bugs.py checks that every planted bug fails these same comparisons.
TOL_FP64 = 1e-10
TOL_FP32 = 5e-5


def max_real_token_error(outputs, reference):
    """Largest |difference| over what carries meaning: the hidden state of every real token
    and the pooled [CLS] output. Padded positions are left out: they feed nothing downstream
    (attention masks them as keys, the classifier reads [CLS]), and in float32 they drift across
    kernels ten times more than real tokens do (3e-5 measured, 6e-5 seen on a Zen 4 CPU)."""
    real = reference["attention_mask"].bool()  # (B, T)
    hidden = outputs["last_hidden_state"].double() - reference["last_hidden_state"].double()
    pooled = outputs["pooled"].double() - reference["pooled"].double()
    return max(hidden[real].abs().max().item(), pooled.abs().max().item())


def minilm_folder():
    from minibert.weights import WEIGHTS_DIR

    return WEIGHTS_DIR / "all-MiniLM-L6-v2"


def require_assets():
    return os.environ.get("MINIBERT_REQUIRE_ASSETS") == "1"


SCHEDULES = [(0, 10), (3, 10), (4, 4), (0, 1), (7, 20), (12, 9)]  # (warmup, total)


def multipliers(make_scheduler, steps_past_the_end):
    """A transformers schedule's multiplier before each optimizer step, up to `steps_past_the_end`
    steps past the last, for each case of SCHEDULES."""
    out = {}
    for warmup, total in SCHEDULES:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, warmup, total)
        values = []
        for _ in range(total + 1 + steps_past_the_end):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        out[f"w{warmup}_t{total}"] = torch.tensor(values, dtype=torch.float64)
    return out


def schedule_reference():
    """transformers' get_linear_schedule_with_warmup, and two steps past the end (where it stays 0)."""
    from transformers import get_linear_schedule_with_warmup

    return multipliers(get_linear_schedule_with_warmup, 2)


def cosine_schedule_reference():
    """transformers' get_cosine_schedule_with_warmup (half a cycle), up to the last step."""
    from transformers import get_cosine_schedule_with_warmup

    return multipliers(get_cosine_schedule_with_warmup, 0)


SWALR_CASES = [(1e-4, 1e-5, 5, "cos"), (3e-5, 1e-5, 3, "linear"), (1e-3, 5e-4, 1, "cos")]


def swa_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))


def swa_reference():
    """torch.optim.swa_utils: AveragedModel over 4 snapshots, and SWALR's rates. The snapshots
    are float32 weights; AveragedModel averages them in float64, so the stored average is their
    exact mean, whatever CPU wrote it."""
    from torch.optim.swa_utils import SWALR, AveragedModel

    model, exact = swa_model(), swa_model().double()
    averaged = AveragedModel(exact)
    out = {}
    for k in range(4):
        with torch.no_grad():
            for p, q in zip(model.parameters(), exact.parameters()):
                p.add_(torch.randn_like(p))
                q.copy_(p)
        out.update({f"snapshot{k}.{n}": p.detach().clone() for n, p in model.named_parameters()})
        averaged.update_parameters(exact)
    out.update({f"average.{n}": p.detach().clone() for n, p in averaged.module.named_parameters()})
    for i, (start, swa_lr, anneal_epochs, strategy) in enumerate(SWALR_CASES):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=start)
        scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        values = []
        for _ in range(8):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        out[f"swalr{i}"] = torch.tensor(values, dtype=torch.float64)
    return out


LORA = {"r": 4, "alpha": 8, "targets": ("query", "value")}


def lora_reference():
    """peft's LoRA on the tiny_odd checkpoint with random (non-zero) float32 A and B; the outputs
    in float64, as for the tiny checkpoints."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    hf = BertModel.from_pretrained(REFERENCE / "tiny_odd")
    peft_model = get_peft_model(hf, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                               target_modules=list(LORA["targets"])))
    torch.manual_seed(5)
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
            layer = name.split("encoder.layer.")[1].split(".")[0]
            target = name.rsplit(".", 1)[1]
            with torch.no_grad():
                module.lora_A["default"].weight.normal_()
                module.lora_B["default"].weight.normal_(std=0.1)
            out[f"layers.{layer}.{target}.lora_A"] = module.lora_A["default"].weight.detach().clone()
            out[f"layers.{layer}.{target}.lora_B"] = module.lora_B["default"].weight.detach().clone()
    out["trainable"] = torch.tensor(sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
    out["all"] = torch.tensor(sum(p.numel() for p in peft_model.parameters()))
    inputs = tiny_inputs(TINY[0])
    return {**out, **inputs, **hf_outputs(peft_model.eval().double(), inputs)}


def contrastive_features():
    torch.manual_seed(7)
    features = torch.nn.functional.normalize(torch.randn(12, 2, 16), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 0, 1, 4])
    single = torch.nn.functional.normalize(torch.randn(10, 1, 16), dim=-1)
    single_labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 6, 7])  # six anchors have no positive
    return {"features": features, "labels": labels, "single": single, "single_labels": single_labels}


def supcon_reference():
    """pytorch-metric-learning's SupConLoss and NTXentLoss, an implementation independent of the
    authors'. It takes (N, D) embeddings: the views are flattened view-major with labels tiled.
    Computed in float64 from the float32 features, so the stored losses carry no float32 rounding."""
    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss

    out = contrastive_features()
    flat = torch.cat(torch.unbind(out["features"].double(), dim=1))
    sentence = torch.arange(len(out["labels"])).repeat(2)
    single = out["single"][:, 0].double()
    out["pml_supcon"] = SupConLoss(temperature=0.07)(flat, out["labels"].repeat(2)).detach()
    out["pml_ntxent"] = NTXentLoss(temperature=0.07)(flat, sentence).detach()
    out["pml_supcon_single"] = SupConLoss(temperature=0.07)(single, out["single_labels"]).detach()
    return out


# Reference files beyond the encoder's: name → function returning a dict of tensors.
EXTRA_REFERENCES = {
    "schedule": schedule_reference,
    "cosine_schedule": cosine_schedule_reference,
    "swa": swa_reference,
    "lora": lora_reference,
    "supcon": supcon_reference,
}


def batch_loss(run, index, contrastive_stage):
    """The loss train.py's step computes on the batch `index` (this process's shard of it)
    → (loss, label logits or None, labels)."""
    import train

    batch = train.shard_on_device(run, index)
    model, loss = train.stage_loss(run, contrastive_stage)
    with run.autocast():
        value, outputs = loss(model, batch)
    return value, None if outputs is None else run.model.coarse(outputs), batch.labels
