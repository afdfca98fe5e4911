"""The warmup schedules, SWA and LoRA equal their references: transformers'
get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup, torch.optim.swa_utils, and
peft. Each stored comparison is a small function with its tolerance beside it; test_planted_bugs.py
shows each fails for a real bug."""

import pytest
import torch
from safetensors.torch import load_file

from minibert import BertConfig, BertModel, count_parameters, load_pretrained, schedule
from minibert.lora import apply_lora, lora_modules
from minibert.schedule import warmup_steps
from minibert.schedule import swa_anneal
from minibert.swa import WeightAverage
from tests import cases
from tests.cases import TOL_FP64, max_real_token_error, minibert_outputs

# The schedule is a few float divisions, correctly rounded on every CPU: agreement with the
# reference's formula is exact (measured: 0). The tolerance only allows the same value computed
# another way (e.g. times a reciprocal); a step off by one moves the multiplier by 1/warmup or
# 1/(total - warmup), 0.077 or more in these cases.
SCHEDULE_TOL = 1e-12


def schedule_error(kind="linear"):
    """Largest |difference| between our multiplier and the stored transformers schedule."""
    name = "schedule" if kind == "linear" else "cosine_schedule"
    stored = load_file(cases.REFERENCE / f"{name}.safetensors")
    multiplier = {"linear": schedule.linear_warmup, "cosine": schedule.cosine_warmup}[kind]
    worst = 0.0
    for warmup, total in cases.SCHEDULES:
        reference = stored[f"w{warmup}_t{total}"]
        ours = torch.tensor([multiplier(s, warmup, total) for s in range(len(reference))], dtype=torch.float64)
        worst = max(worst, (ours - reference).abs().max().item())
    return worst


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_stored_reference(kind):
    assert schedule_error(kind) <= SCHEDULE_TOL


def test_schedule_matches_transformers_live(transformers):
    for warmup, total in [(2, 13), (0, 720 * 10), (72, 720)]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
        for step in range(0, total + 2, max(1, total // 50)):
            expected = scheduler.lr_lambdas[0](step)
            assert abs(schedule.linear_warmup(step, warmup, total) - expected) <= SCHEDULE_TOL


def test_cosine_schedule_matches_transformers_live(transformers):
    for warmup, total in [(2, 13), (0, 720 * 10), (72, 720)]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
        for step in range(0, total + 1):
            expected = scheduler.lr_lambdas[0](step)
            assert abs(schedule.cosine_warmup(step, warmup, total) - expected) <= SCHEDULE_TOL


def test_warmup_from_steps_or_ratio():
    assert warmup_steps(7200) == 0
    assert warmup_steps(7200, steps=100) == 100
    assert warmup_steps(7200, ratio=0.06) == 432
    with pytest.raises(ValueError, match="both"):
        warmup_steps(7200, steps=1, ratio=0.1)


# Our running mean is kept in float32; the stored average is the exact (float64) mean. Four
# updates, each rounded to half a float32 ulp of weights below 5 in size, put us within
# 4 x 2.4e-7 ≈ 1e-6 of it (measured: 1.8e-7). A mean off by one snapshot is off by 0.7 or more.
SWA_TOL = 1e-5


def swa_error():
    """Largest |difference| between WeightAverage over the stored snapshots and both the stored
    AveragedModel result and the snapshots' arithmetic mean."""
    stored = load_file(cases.REFERENCE / "swa.safetensors")
    model = cases.swa_model()
    average = WeightAverage(model)
    for k in range(4):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(stored[f"snapshot{k}.{name}"])
        average.update()
    worst = 0.0
    for name, value in average.state().items():
        mean = torch.stack([stored[f"snapshot{k}.{name}"] for k in range(4)]).double().mean(0)
        for expected in (stored[f"average.{name}"], mean):
            worst = max(worst, (value.double() - expected).abs().max().item())
    return worst


def test_weight_average_matches_averaged_model():
    assert swa_error() <= SWA_TOL


def test_swa_lr_matches_swalr():
    stored = load_file(cases.REFERENCE / "swa.safetensors")
    for i, (start, target, anneal_epochs, strategy) in enumerate(cases.SWALR_CASES):
        ours = torch.tensor([swa_anneal(k, start, target, anneal_epochs, strategy) for k in range(8)],
                            dtype=torch.float64)
        assert torch.allclose(ours, stored[f"swalr{i}"], rtol=1e-9, atol=0), strategy


def test_swa_matches_torch_live():
    from torch.optim.swa_utils import AveragedModel

    model = cases.swa_model()
    reference, ours = AveragedModel(model), WeightAverage(model)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(torch.randn_like(p))
        reference.update_parameters(model)
        ours.update()
    for name, p in reference.module.named_parameters():
        assert (ours.state()[name] - p).abs().max() <= SWA_TOL


def tiny_lora_model():
    model, _, _ = load_pretrained(str(cases.REFERENCE / "tiny_odd"))
    apply_lora(model, r=cases.LORA["r"], alpha=cases.LORA["alpha"], targets=cases.LORA["targets"])
    return model.eval()


def lora_error(model):
    """How far `model`, tiny_odd with LoRA applied, is from peft once it holds the stored A and B;
    run in float64 like the tiny checkpoints (tolerance and measurements in cases.py)."""
    stored = load_file(cases.REFERENCE / "lora.safetensors")
    params = dict(model.named_parameters())
    for name in [k for k in stored if ".lora_" in k]:
        with torch.no_grad():
            params[name].copy_(stored[name])
    return max_real_token_error(minibert_outputs(model.double(), stored), stored)


def test_lora_matches_peft_stored_reference():
    stored = load_file(cases.REFERENCE / "lora.safetensors")
    model = tiny_lora_model()
    assert count_parameters(model, trainable_only=True) == int(stored["trainable"])
    assert count_parameters(model) == int(stored["all"])
    assert lora_error(model) <= TOL_FP64


def test_lora_matches_peft_live(peft, transformers):
    torch.manual_seed(9)
    hf = transformers.BertModel.from_pretrained(cases.REFERENCE / "tiny_odd")
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=7, target_modules=["query", "value"])).eval()
    model, _, _ = load_pretrained(str(cases.REFERENCE / "tiny_odd"))
    apply_lora(model, r=3, alpha=7)
    ours = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    for name, module in reference.named_modules():
        if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.ModuleDict):
            layer, target = name.split("encoder.layer.")[1].split(".")[0], name.rsplit(".", 1)[1]
            with torch.no_grad():
                module.lora_B["default"].weight.normal_()
                ours[f"layers.{layer}.{target}"].lora_A.copy_(module.lora_A["default"].weight)
                ours[f"layers.{layer}.{target}"].lora_B.copy_(module.lora_B["default"].weight)
    inputs = cases.tiny_inputs(cases.TINY[0])
    expected = {**inputs, **cases.hf_outputs(reference.double(), inputs)}
    assert max_real_token_error(minibert_outputs(model.eval().double(), inputs), expected) <= TOL_FP64


def test_lora_at_step_zero_is_the_base_model():
    base, _, _ = load_pretrained(str(cases.REFERENCE / "tiny_odd"))
    model = tiny_lora_model()
    inputs = cases.tiny_inputs(cases.TINY[0])
    with torch.no_grad():
        assert torch.equal(model(**inputs), base.eval()(**inputs))


def test_lora_training_step_leaves_base_weights_and_merge_agrees():
    model = tiny_lora_model().train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = cases.tiny_inputs(cases.TINY[0])
    for _ in range(3):
        model(**inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs)
        for m in lora_modules(model):
            m.merge()
        merged = model(**inputs)
        for m in lora_modules(model):
            m.unmerge()
        again = model(**inputs)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("r, trainable, total", [(20, 737_280, 110_219_520), (30, 1_105_920, 110_588_160)])
def test_lora_counts_for_bert_base_match_the_paper(r, trainable, total):
    model = BertModel(BertConfig())
    apply_lora(model, r=r, alpha=r)
    assert count_parameters(model, trainable_only=True) == trainable
    assert count_parameters(model) == total
    assert round(100 * trainable / total, 4) == pytest.approx(0.6689 if r == 20 else 1.0001, abs=1e-4)


def test_lora_targets_must_exist():
    with pytest.raises(ValueError, match="no Linear module is named qkv"):
        apply_lora(BertModel(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                        intermediate_size=8, vocab_size=10)), r=2, alpha=2, targets=("qkv",))
