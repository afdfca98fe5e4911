"""Token ids equal transformers' BertTokenizerFast (truncation on, max_length 20)."""

import pytest
import torch
from safetensors.torch import load_file

from minibert import Tokenizer
from minibert.data import load_massive
from tests import cases


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt"])
def tokenizer(request, minilm_dir):
    if request.param == "tokenizer.json":
        return Tokenizer.from_folder(minilm_dir)
    return Tokenizer.from_vocab(minilm_dir / "vocab.txt")


def test_ids_match_stored_reference(tokenizer):
    stored = load_file(cases.REFERENCE / "minilm.safetensors")
    input_ids, attention_mask = tokenizer(cases.SENTENCES, max_len=cases.MAX_LEN)
    assert torch.equal(input_ids, stored["input_ids"])
    assert torch.equal(attention_mask, stored["attention_mask"])


def test_truncation_keeps_sep_last(tokenizer):
    (ids,) = tokenizer.encode([cases.SENTENCES[-1]], max_len=20)
    assert len(ids) == 20 and ids[0] == 101 and ids[-1] == 102
    (exact,) = tokenizer.encode(["one two three four five six seven eight nine ten eleven twelve "
                                 "thirteen fourteen fifteen sixteen seventeen eighteen"], max_len=20)
    assert len(exact) == 20 and exact[-2] != 102  # 18 words fill 20 slots exactly: nothing cut


def test_every_massive_utterance_matches_transformers(tokenizer, transformers, minilm_dir, massive_path):
    data = load_massive(massive_path)
    texts = [e.text for split in (data.train, data.dev, data.test) for e in split]
    assert len(texts) == 16_521
    reference = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    expected = reference(texts, truncation=True, max_length=20)["input_ids"]
    ours = tokenizer.encode(texts, max_len=20)
    mismatches = [t for t, a, b in zip(texts, ours, expected) if a != b]
    assert not mismatches, mismatches[:5]
