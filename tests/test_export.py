"""`python -m minibert export RUN FOLDER` writes a folder that transformers loads as the run itself:
BertModel gives the run's hidden states, BertTokenizer its word-piece ids, and the head rebuilt
from head.json's words alone its logits.

Two runs are saved without training, on the tiny reference encoder: one fine-tuned in full (its
weights moved off the reference, so that the export has to read the run's own), and one with LoRA
adapters whose B is random, compared with minibert's adapters unmerged, so that the merge
W + (alpha / r) · B A is what is tested. Their vocabulary is the sentences' own words in the tiny
model's 99 ids: capitals, an accent, punctuation, words split into pieces and one unknown.
A planted bug, one layer's query and key swapped in the name mapping, shows the comparison failing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minibert import export
from minibert.__main__ import main
from minibert.classifier import ScenarioClassifier
from minibert.experiments import TrainConfig
from minibert.lora import apply_lora, lora_modules
from minibert.runs import load_model, save_model
from minibert.tokenizer import Tokenizer
from minibert.weights import load_pretrained
from tests.cases import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
TINY = REFERENCE / "tiny_odd"  # 99 ids, max_position_embeddings 16
MAX_LEN = 12
SENTENCES = [
    "Wake me up at seven tomorrow",  # "tomorrow" is not in the vocabulary: [UNK]
    "what's the weather like in Paris?",
    "book a table at the Café Olly",
    "play some jazz",
    "remind me to call mum, turn the lights off and play the kitchen playlist",  # cut to MAX_LEN
]
VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] ' , ? a and at book cafe call in jazz kitchen lights like me mum off "
         "olly paris play some the table to turn up wake weather what seven s ##list ##ing ##s").split()
LABELS = ("alarm", "music", "weather")
ATOL = 1e-5


def write_run(folder, lora):
    """A run folder as train.py leaves it. In full: every weight moved by noise, as training would,
    [CLS] read, one output per label. LoRA: adapters on matrices square and not, B random; the
    mean of the word-pieces read, and five finer classes summed into the three labels."""
    torch.manual_seed(0)
    encoder, _, _ = load_pretrained(str(TINY))
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in VOCAB + [f"w{i}" for i in range(99 - len(VOCAB))]))
    tokenizer = Tokenizer.from_vocab(vocab)
    if lora:
        config = TrainConfig(max_len=MAX_LEN, lora_r=4, lora_alpha=8.0, lora_targets="query,value,intermediate",
                             pooling="mean", hidden_dim=5, drop_rate=0.5)
        apply_lora(encoder, config.lora_r, config.lora_alpha, targets=config.lora_target_list)
        for module in lora_modules(encoder):
            torch.nn.init.normal_(module.lora_B, std=0.5)
        groups = [0, 1, 1, 2, 0]
    else:
        config = TrainConfig(max_len=MAX_LEN, hidden_dim=5, drop_rate=0.5)
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.1 * torch.randn_like(p))
        groups = None
    model = ScenarioClassifier(encoder, len(LABELS), config.hidden_dim, config.drop_rate, groups, config.pooling)
    folder.mkdir()
    save_model(folder, model, tokenizer, LABELS, config)
    return folder


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """(run, exported folder) of the full run, exported by the command itself."""
    tmp = tmp_path_factory.mktemp("full")
    run = write_run(tmp / "run", lora=False)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "minibert", "export", str(run), str(tmp / "hf")], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp / "hf")
    return run, tmp / "hf"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    run = write_run(tmp / "run", lora=True)
    return run, export.export_run(run, tmp / "hf")


def hidden_states(transformers, run, folder):
    """minibert's encoder and transformers' BertModel from `folder`, on SENTENCES padded to the
    longest, in fp32 and eval mode → (the run's model, the batch, minibert's last hidden state,
    transformers' output)."""
    model, tokenizer, meta = load_model(run)
    input_ids, attention_mask = tokenizer(SENTENCES, meta["max_len"])
    hf, loading = transformers.BertModel.from_pretrained(folder, output_loading_info=True)
    assert not any(loading.values()), loading  # every weight found, none left over or misshapen
    with torch.no_grad():
        ours = model.encoder(input_ids, attention_mask)  # (B, T, H)
        theirs = hf.eval()(input_ids=input_ids, attention_mask=attention_mask)
    assert attention_mask.min() == 0 and theirs.last_hidden_state.dtype == torch.float32  # padded, fp32
    return model, (input_ids, attention_mask), ours, theirs


def assert_same(ours, theirs):
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_a_full_run_gives_its_hidden_states_and_pooled_output(transformers, full):
    model, _, ours, theirs = hidden_states(transformers, *full)
    assert_same(ours, theirs.last_hidden_state)
    assert_same(model.encoder.pool(ours), theirs.pooler_output)


def test_a_lora_run_gives_the_hidden_states_of_its_unmerged_adapters(transformers, lora):
    model, batch, ours, theirs = hidden_states(transformers, *lora)
    assert not any(m.merged for m in lora_modules(model.encoder))  # minibert adds B A x on the fly
    assert_same(ours, theirs.last_hidden_state)
    assert_same(model.encoder.pool(ours), theirs.pooler_output)
    without_adapters, _, _ = load_pretrained(str(TINY))
    with torch.no_grad():  # the updates are large enough that a merge left out would show
        assert (without_adapters(*batch) - ours).abs().max() > 100 * ATOL


def test_the_folder_is_a_minibert_model_folder_too(full):
    model, tokenizer, _ = load_model(full[0])
    reloaded, reloaded_tokenizer, _ = load_pretrained(str(full[1]))
    input_ids, attention_mask = tokenizer(SENTENCES, MAX_LEN)
    assert reloaded_tokenizer.encode(SENTENCES, MAX_LEN) == tokenizer.encode(SENTENCES, MAX_LEN)
    with torch.no_grad():
        assert_same(model.encoder(input_ids, attention_mask), reloaded.eval()(input_ids, attention_mask))


def rebuilt_logits(transformers, folder, sentences):
    """The classifier as a reader rebuilds it from the folder alone, following head.json's `apply`
    step by step: transformers' tokenizer and BertModel, then the head in plain torch."""
    record = json.loads((folder / "head.json").read_text())
    head = load_file(folder / "head.safetensors")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(sentences, truncation=True, max_length=record["max_len"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state  # (B, T, H)
    if record["pooling"] == "cls":
        x = hidden[:, 0]
    else:
        mask = batch["attention_mask"][:, :, None].float()  # (B, T, 1)
        x = (hidden * mask).sum(1) / mask.sum(1)
    h = torch.relu(x @ head["head.0.weight"].T + head["head.0.bias"])  # dropout: nothing at inference
    y = h @ head["head.2.weight"].T + head["head.2.bias"]  # (B, outputs)
    if record["groups"] is None:
        return y
    groups = torch.tensor(record["groups"])
    return torch.stack([y[:, groups == i].logsumexp(dim=1) for i in range(len(record["labels"]))], dim=1)


@pytest.mark.parametrize("which", ["full", "lora"])
def test_the_head_rebuilt_from_head_json_gives_the_run_s_logits(transformers, which, request):
    run, folder = request.getfixturevalue(which)
    model, tokenizer, _ = load_model(run)
    record = json.loads((folder / "head.json").read_text())
    assert record["labels"] == list(LABELS) and record["max_len"] == MAX_LEN
    assert (record["pooling"], record["groups"] is None) == (("cls", True) if which == "full" else ("mean", False))
    with torch.no_grad():
        logits = model(*tokenizer(SENTENCES, MAX_LEN))  # (B, labels)
    assert logits.shape == (len(SENTENCES), len(LABELS))
    assert_same(logits, rebuilt_logits(transformers, folder, SENTENCES))


def test_transformers_tokenizes_as_the_run_did(transformers, full, tmp_path):
    """From tokenizer.json, and from vocab.txt with tokenizer_config.json alone (the uncased
    normalisation then comes from do_lower_case and strip_accents); with truncation at max_len."""
    _, tokenizer, _ = load_model(full[0])
    ids = tokenizer.encode(SENTENCES, MAX_LEN)
    assert tokenizer.backend.token_to_id("[UNK]") in ids[0] and max(map(len, ids)) == MAX_LEN
    assert tokenizer.backend.token_to_id("cafe") in ids[2]  # Café, lowercased and its accent stripped
    shutil.copytree(full[1], tmp_path / "vocab_only")
    (tmp_path / "vocab_only" / "tokenizer.json").unlink()
    for loaded in (transformers.AutoTokenizer.from_pretrained(full[1]),
                   transformers.BertTokenizer.from_pretrained(tmp_path / "vocab_only")):
        assert loaded(SENTENCES, truncation=True, max_length=MAX_LEN)["input_ids"] == ids, type(loaded)


def test_the_comparison_fails_when_query_and_key_are_swapped(transformers, full, tmp_path, monkeypatch):
    """The planted bug: layer 1's query weights exported under its key's names, and its key's under
    its query's."""
    mapped, swapped = export.source_name, {"layers.1.query": "layers.1.key", "layers.1.key": "layers.1.query"}

    def swap_query_and_key(name):
        module, _, leaf = name.rpartition(".")
        return mapped(f"{swapped.get(module, module)}.{leaf}")

    monkeypatch.setattr(export, "source_name", swap_query_and_key)
    _, _, ours, theirs = hidden_states(transformers, full[0], export.export_run(full[0], tmp_path / "hf"))
    with pytest.raises(AssertionError):
        assert_same(ours, theirs.last_hidden_state)


@pytest.mark.parametrize("case, message", [
    ("missing run", "no such folder; pass a run folder written by train.py"),
    ("folder not empty", "holds notes.txt that this command did not write, and it never overwrites"),
    ("folder a file", "a file, not a folder"),
])
def test_bad_input_is_refused_in_one_line(case, message, full, tmp_path, capsys):
    run, folder = full[0], tmp_path / "new"
    if case == "missing run":
        run = tmp_path / "no-run"
    elif case == "folder not empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    else:
        folder.write_text("mine")
    with pytest.raises(SystemExit) as exited:
        main(["export", str(run), str(folder)])
    line = exited.value.code  # sys.exit("...") prints it and exits with status 1
    assert isinstance(line, str) and len(line.splitlines()) == 1, line
    assert line.startswith("minibert: ") and message in line, line
    assert str(run if case == "missing run" else folder) in line, line
    if case == "missing run":
        assert not folder.exists()  # refused before anything was written
    else:
        assert (folder.read_text() if folder.is_file() else (folder / "notes.txt").read_text()) == "mine"
    assert capsys.readouterr().out == ""


def test_the_weights_command_still_prints_its_folder(capsys):
    main(["weights", str(TINY)])
    assert capsys.readouterr().out.strip() == str(TINY)


def test_a_failed_export_leaves_nothing_behind(full, tmp_path, monkeypatch):
    """A full disk half way: neither the folder nor a temporary one remains, and an empty folder
    given stays as it was."""
    def full_disk(path, tokenizer):
        raise ValueError(f"cannot write {path} (No space left on device)")

    monkeypatch.setattr(export, "save_tokenizer", full_disk)
    for given in (tmp_path / "new", tmp_path / "empty"):
        if given.name == "empty":
            given.mkdir()
        with pytest.raises(SystemExit, match="No space left on device"):
            main(["export", str(full[0]), str(given)])
        assert sorted(p.name for p in tmp_path.iterdir()) == (["empty"] if given.name == "empty" else [])
