"""The encoder computes what transformers' BertModel computes.

The story: a checkpoint written by transformers (random, odd sizes; or the real all-MiniLM-L6-v2)
is loaded into minibert by the strict loader, the same inputs go through both, and every real
token's hidden state and the pooled output agree. The random checkpoints run in float64, where
two correct implementations agree to ~1e-14 on any CPU; the real model runs in float32, as it
trains, where they agree to a few 1e-6. cases.py holds the tolerances and the measurements behind
them; test_planted_bugs.py shows that the same comparisons fail for real bugs. Stored references
make this run anywhere; with transformers installed the same cases, and new random ones, are
also recomputed live.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibert import BertConfig, BertModel, count_parameters, load_pretrained
from minibert.weights import load_state
from tests import cases
from tests.cases import TOL_FP32, TOL_FP64, max_real_token_error, minibert_outputs


def tiny_error(model, case):
    """How far `model`, run in float64, is from transformers on a tiny case's stored inputs."""
    io = load_file(cases.REFERENCE / case.name / "io.safetensors")
    return max_real_token_error(minibert_outputs(model.eval().double(), io), io)


def minilm_error(model):
    """How far `model` (all-MiniLM-L6-v2, float32) is from transformers on the stored sentences."""
    io = load_file(cases.REFERENCE / "minilm.safetensors")
    return max_real_token_error(minibert_outputs(model, io), io)


@pytest.mark.parametrize("case", cases.TINY, ids=lambda c: c.name)
def test_tiny_checkpoints_match_stored_reference(case):
    model, _, config = load_pretrained(str(cases.REFERENCE / case.name))
    assert config.hidden_size == case.hidden_size
    assert tiny_error(model, case) <= TOL_FP64


def test_minilm_matches_stored_reference(minilm):
    model, tokenizer, _ = minilm
    io = load_file(cases.REFERENCE / "minilm.safetensors")
    input_ids, attention_mask = tokenizer(cases.SENTENCES, max_len=cases.MAX_LEN)
    assert torch.equal(input_ids, io["input_ids"]) and torch.equal(attention_mask, io["attention_mask"])
    assert minilm_error(model) <= TOL_FP32


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
    expected = {**inputs, **cases.hf_outputs(hf.double(), inputs)}
    assert max_real_token_error(minibert_outputs(model.eval().double(), inputs), expected) <= TOL_FP64


def test_minilm_matches_transformers_live(transformers, minilm, minilm_dir):
    model, tokenizer, _ = minilm
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    input_ids, attention_mask = tokenizer(cases.SENTENCES[::-1], max_len=cases.MAX_LEN)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "token_type_ids": torch.zeros_like(input_ids)}
    expected = {**inputs, **cases.hf_outputs(hf, inputs)}
    assert max_real_token_error(minibert_outputs(model, inputs), expected) <= TOL_FP32


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
