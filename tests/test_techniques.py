"""The warmup schedule, SWA and LoRA equal their references: transformers'
get_linear_schedule_with_warmup, torch.optim.swa_utils, and peft."""

import pytest
import torch
from safetensors.torch import load_file

from minibert import BertConfig, BertModel, count_parameters, load_pretrained
from minibert.lora import apply_lora, lora_modules
from minibert.schedule import linear_warmup, warmup_steps
from minibert.swa import WeightAverage, swa_lr
from tests import cases


def test_schedule_matches_stored_reference():
    stored = load_file(cases.REFERENCE / "schedule.safetensors")
    for warmup, total in cases.SCHEDULES:
        ours = torch.tensor([linear_warmup(s, warmup, total) for s in range(total + 3)], dtype=torch.float64)
        assert torch.allclose(ours, stored[f"w{warmup}_t{total}"], rtol=0, atol=1e-12), (warmup, total)


def test_schedule_matches_transformers_live(transformers):
    for warmup, total in [(2, 13), (0, 720 * 10), (72, 720)]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
        for step in range(0, total + 2, max(1, total // 50)):
            assert scheduler.lr_lambdas[0](step) == pytest.approx(linear_warmup(step, warmup, total), abs=1e-12)


def test_warmup_from_steps_or_ratio():
    assert warmup_steps(7200) == 0
    assert warmup_steps(7200, steps=100) == 100
    assert warmup_steps(7200, ratio=0.06) == 432
    with pytest.raises(ValueError, match="not both"):
        warmup_steps(7200, steps=1, ratio=0.1)


def test_weight_average_matches_averaged_model():
    stored = load_file(cases.REFERENCE / "swa.safetensors")
    model = cases.swa_model()
    average = WeightAverage(model)
    for k in range(4):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(stored[f"snapshot{k}.{name}"])
        average.update()
    for name, value in average.state().items():
        assert torch.allclose(value, stored[f"average.{name}"], atol=1e-6), name
        snapshots = torch.stack([stored[f"snapshot{k}.{name}"] for k in range(4)])
        assert torch.allclose(value, snapshots.mean(0), atol=1e-6)  # it is the arithmetic mean


def test_swa_lr_matches_swalr():
    stored = load_file(cases.REFERENCE / "swa.safetensors")
    for i, (start, target, anneal_epochs, strategy) in enumerate(cases.SWALR_CASES):
        ours = torch.tensor([swa_lr(k, start, target, anneal_epochs, strategy) for k in range(8)], dtype=torch.float64)
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
        assert torch.allclose(ours.state()[name], p, atol=1e-6)


def tiny_lora_model():
    model, _, _ = load_pretrained(str(cases.REFERENCE / "tiny_odd"))
    apply_lora(model, r=cases.LORA["r"], alpha=cases.LORA["alpha"], targets=cases.LORA["targets"])
    return model.eval()


def test_lora_matches_peft_stored_reference():
    stored = load_file(cases.REFERENCE / "lora.safetensors")
    model = tiny_lora_model()
    params = dict(model.named_parameters())
    for name in [k for k in stored if ".lora_" in k]:
        with torch.no_grad():
            params[name].copy_(stored[name])
    with torch.no_grad():
        hidden = model(stored["input_ids"], stored["attention_mask"], stored["token_type_ids"])
    assert (hidden - stored["last_hidden_state"]).abs().max() <= 1e-5
    assert count_parameters(model, trainable_only=True) == int(stored["trainable"])
    assert count_parameters(model) == int(stored["all"])


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
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
        assert (model.eval()(**inputs) - expected).abs().max() <= 1e-5


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
