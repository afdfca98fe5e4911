"""The encoder computes what transformers' BertModel computes.

The story: a checkpoint written by transformers (random, odd sizes; or the real all-MiniLM-L6-v2)
is loaded into minibert by the strict loader, the same inputs go through both, and the hidden
states and pooled outputs agree to 1e-5 in fp32. Stored references make this run anywhere;
with transformers installed the same cases, and new random ones, are also recomputed live.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibert import BertConfig, BertModel, count_parameters, load_pretrained
from minibert.weights import load_state
from tests import cases

TOL = 1e-5


def run(model, io):
    with torch.no_grad():
        hidden = model(io["input_ids"], io["attention_mask"], io["token_type_ids"])
        return hidden, model.pool(hidden)


def assert_close(hidden, pooled, io):
    assert (hidden - io["last_hidden_state"]).abs().max() <= TOL
    assert (pooled - io["pooled"]).abs().max() <= TOL


@pytest.mark.parametrize("case", cases.TINY, ids=lambda c: c.name)
def test_tiny_checkpoints_match_stored_reference(case):
    folder = cases.REFERENCE / case.name
    model, _, config = load_pretrained(str(folder))
    assert config.hidden_size == case.hidden_size
    io = load_file(folder / "io.safetensors")
    assert_close(*run(model.eval(), io), io)


def test_minilm_matches_stored_reference(minilm):
    model, tokenizer, _ = minilm
    io = load_file(cases.REFERENCE / "minilm.safetensors")
    input_ids, attention_mask = tokenizer(cases.SENTENCES)
    assert torch.equal(input_ids, io["input_ids"]) and torch.equal(attention_mask, io["attention_mask"])
    assert_close(*run(model, io), io)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fresh_random_configs_match_transformers_live(transformers, seed, tmp_path):
    g = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 5, (1,), generator=g))
    case = cases.TinyCase(f"live{seed}", hidden_size=heads * int(torch.randint(3, 17, (1,), generator=g)),
                          num_attention_heads=heads, num_hidden_layers=int(torch.randint(1, 4, (1,), generator=g)),
                          intermediate_size=int(torch.randint(5, 70, (1,), generator=g)), vocab_size=101,
                          batch=6, length=int(torch.randint(2, 16, (1,), generator=g)),
                          bert_layout=bool(seed % 2), seed=seed)
    hf = cases.tiny_hf_model(case)
    model = BertModel(BertConfig(**{k: v for k, v in hf.config.to_dict().items()
                                    if k in BertConfig.__dataclass_fields__}))
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if case.bert_layout:
        state = cases.to_bert_base_layout(state, hf.config)
    save_file(state, tmp_path / "model.safetensors")
    load_state(model, tmp_path / "model.safetensors")
    inputs = cases.tiny_inputs(case)
    assert_close(*run(model.eval(), inputs), {**inputs, **cases.hf_outputs(hf, inputs)})


def test_minilm_matches_transformers_live(transformers, minilm, minilm_dir):
    model, tokenizer, _ = minilm
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    input_ids, attention_mask = tokenizer(cases.SENTENCES[::-1])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "token_type_ids": torch.zeros_like(input_ids)}
    assert_close(*run(model, inputs), {**inputs, **cases.hf_outputs(hf, inputs)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_padding_row_stays_finite(dtype):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=40)).eval().to(dtype)
    input_ids = torch.randint(1, 50, (3, 6))
    attention_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6])
    with torch.no_grad():
        hidden = model(input_ids, attention_mask)
    assert hidden.dtype == dtype and torch.isfinite(hidden).all()
    # The other rows are untouched by the empty one.
    with torch.no_grad():
        alone = model(input_ids[[0]], attention_mask[[0]])
    assert torch.allclose(alone[0, :3].float(), hidden[0, :3].float(), atol=1e-2 if dtype != torch.float32 else 1e-6)


def test_bert_base_parameter_count():
    # The paper's LoRA table counts bert-base-uncased as 109,482,240 parameters, pooler included.
    assert count_parameters(BertModel(BertConfig())) == 109_482_240
    assert count_parameters(BertModel(BertConfig(), with_pooler=False)) == 109_482_240 - 768 * 768 - 768


def test_import_loads_no_reference_library():
    code = "import sys, minibert; print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
