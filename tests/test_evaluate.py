"""What `evaluate.py RUN_DIR` leaves in the run folder agrees with itself, and its figures with a
hand computation.

The run is an untrained classifier on the tiny reference model: its guesses are poor, which is
all these checks need (several labels, plenty of mistakes). Nothing here trains."""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
from minibert.agreement import agreement
from minibert.agreement import main as agreement_main
from minibert.classifier import ScenarioClassifier
from minibert.data import SCENARIOS, encode, load_massive
from minibert.embeddings import embed
from minibert.evaluation import accuracy_interval, confusion_matrix, label_metrics
from minibert.experiments import TrainConfig
from minibert.runs import read_json
from minibert.weights import load_pretrained
from tests import cases

ROOT = Path(__file__).resolve().parents[1]
TINY = cases.REFERENCE / "tiny_odd"  # max_position_embeddings 16


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write_run(folder, data):
    """A run folder as train.py leaves it, of an untrained classifier on the tiny model. Untrained,
    its [CLS] vectors barely differ between sentences, so every sentence would get the same label;
    the head's first layer is centred on the dev vectors and scaled to their spread, so that the
    guesses fall on several labels and a few are right."""
    torch.manual_seed(0)
    encoder, tokenizer, _ = load_pretrained(str(TINY))
    model = ScenarioClassifier(encoder, len(SCENARIOS))
    z = embed(model, encode(tokenizer, data.dev, data.label_ids(data.dev, "scenario"), 16))  # (N, H)
    first, last = model.head[0], model.head[2]
    with torch.no_grad():
        first.weight /= z.std(0).mean()
        first.bias.copy_(-first.weight @ z.mean(0))
        torch.nn.init.normal_(last.weight)
        last.bias.zero_()
    folder.mkdir(parents=True)
    train.save_model(folder, model, tokenizer, SCENARIOS, TrainConfig(max_len=16))
    return folder


@pytest.fixture(scope="module")
def evaluated(small_massive, tmp_path_factory):
    """A run folder after `evaluate.py RUN_DIR --split dev` on the 48 dev sentences."""
    run = write_run(tmp_path_factory.mktemp("runs") / "run", load_massive(small_massive))
    evaluate.main([str(run), "--split", "dev", "--data", str(small_massive), "--device", "cpu"])
    return run


def test_macro_f1_by_hand_with_a_label_never_predicted():
    gold = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 1])  # c is never predicted; d is in neither
    confusion = confusion_matrix(predicted, gold, 4)
    assert confusion.tolist() == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]]
    result = label_metrics(confusion, ["a", "b", "c", "d"])
    # a: 2 right of 3 predicted, of 2 gold; b: 1 of 3, of 2; c: precision 0/0, 0 by convention.
    by_hand = {"a": (2 / 3, 1, 2 * 2 / (3 + 2)), "b": (1 / 3, 1 / 2, 2 * 1 / (3 + 2)), "c": (0, 0, 0)}
    assert set(result["per_label"]) == set(by_hand)  # d has no figures at all
    for name, (precision, recall, f1) in by_hand.items():
        figures = result["per_label"][name]
        assert (figures["precision"], figures["recall"], figures["f1"]) == pytest.approx((precision, recall, f1))
        assert figures["support"] == 2
    assert result["macro_f1"] == pytest.approx((0.8 + 0.4 + 0) / 3)


def test_accuracy_interval_is_binomial():
    se, (low, high) = accuracy_interval(0.9, 100)
    assert se == pytest.approx(0.03)  # sqrt(0.9 · 0.1 / 100)
    assert (low, high) == pytest.approx((0.9 - 1.96 * 0.03, 0.9 + 1.96 * 0.03))


def test_the_records_of_a_split_agree(evaluated, small_massive):
    record = read_json(evaluated / "eval-dev.json")
    n, accuracy = record["n"], record["accuracy"]
    assert n == 48
    assert {"loss", "loss_paper_sum", "per_label_accuracy", "most_confused"} <= set(record)  # the old figures stay
    assert record["accuracy_se"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / n))
    assert record["accuracy_ci95"] == pytest.approx([accuracy - 1.96 * record["accuracy_se"],
                                                     accuracy + 1.96 * record["accuracy_se"]])

    header, *rows = read_csv(evaluated / "predictions-dev.csv")
    assert header == ["id", "utterance", "gold", "predicted", "probability"]
    dev = [json.loads(line) for line in small_massive.read_text().splitlines() if '"partition": "dev"' in line]
    assert [row[:3] for row in rows] == [[r["id"], r["utt"], r["scenario"]] for r in dev]
    assert all(0 < float(row[4]) <= 1 for row in rows)
    assert sum(row[2] == row[3] for row in rows) / n == pytest.approx(accuracy)

    header, *rows = read_csv(evaluated / "confusion-dev.csv")
    assert header[1:] == list(SCENARIOS) and [row[0] for row in rows] == list(SCENARIOS)
    confusion = torch.tensor([[int(c) for c in row[1:]] for row in rows])  # rows gold, columns predicted
    assert confusion.sum() == n
    assert confusion.trace() / n == pytest.approx(accuracy)
    assert 0 < confusion.trace() < n and (confusion.sum(0) > 0).sum() > 2  # something to disagree about
    gold, predicted = confusion.sum(1).tolist(), confusion.sum(0).tolist()
    assert any(g > 0 and p == 0 for g, p in zip(gold, predicted))  # a label never predicted
    assert set(record["per_label"]) == {name for name, g, p in zip(SCENARIOS, gold, predicted) if g + p > 0}
    for i, name in enumerate(SCENARIOS):
        if name in record["per_label"]:
            figures, right = record["per_label"][name], confusion[i, i].item()
            assert figures["recall"] == pytest.approx(right / gold[i] if gold[i] else 0)
            assert figures["precision"] == pytest.approx(right / predicted[i] if predicted[i] else 0)
            assert figures["support"] == gold[i]
    f1 = [figures["f1"] for figures in record["per_label"].values()]
    assert record["macro_f1"] == pytest.approx(sum(f1) / len(f1))
    if importlib.util.find_spec("matplotlib"):
        assert (evaluated / "confusion-dev.png").stat().st_size > 1000


def test_without_matplotlib_the_picture_is_skipped(evaluated, small_massive, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    evaluate.main([str(evaluated), "--split", "test", "--data", str(small_massive), "--device", "cpu"])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (evaluated / "confusion-test.csv").exists() and not (evaluated / "confusion-test.png").exists()


def test_predict_file_reads_standard_input_in_batches(evaluated, capsys):
    done = subprocess.run([sys.executable, "evaluate.py", str(evaluated), "--predict-file", "-", "--device", "cpu"],
                          input="wake me up at seven\n\nplay some jazz please\n", cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.strip().splitlines()]
    assert [sentence for _, _, sentence in lines] == ["wake me up at seven", "play some jazz please"]
    assert all(label in SCENARIOS and 0 < float(p) <= 1 for label, p, _ in lines)
    # Padded beside a longer sentence, the first one is classified as it is alone.
    evaluate.main([str(evaluated), "--predict", "wake me up at seven", "--device", "cpu"])
    label, probability = capsys.readouterr().out.split()
    assert [label, float(probability.strip("()"))] == [lines[0][0], pytest.approx(float(lines[0][1]), abs=1e-3)]


def test_bad_sentences_file_or_device_is_one_line(evaluated, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    refused = [
        (["--predict-file", str(tmp_path / "nowhere.txt")], "nowhere.txt: cannot read (No such file or directory)"),
        (["--predict-file", str(tmp_path)], "cannot read (Is a directory)"),
        (["--predict-file", str(tmp_path / "empty.txt")], "empty.txt: no sentences"),
    ]
    if not torch.cuda.is_available():
        refused.append((["--device", "cuda"], "torch sees no CUDA device"))
    for argv, message in refused:
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(evaluated), *argv])
        assert message in e.value.code and "\n" not in e.value.code
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(evaluated), "--predict", "hi", "--predict-file", "-"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_agreement_by_hand():
    labels = torch.tensor([0, 1, 2, 0])
    # Three runs on four sentences: the first right by all, the second wrong by all (each its own way),
    # the third right by one run only, the fourth wrong by one.
    predicted = torch.tensor([[0, 0, 2, 0],
                              [0, 2, 1, 1],
                              [0, 0, 0, 0]])
    confidence = torch.tensor([0.9, 0.6, 0.6])[:, None, None]  # the first run is the surest
    probabilities = torch.nn.functional.one_hot(predicted, 3) * confidence + (1 - confidence) / 3
    result, every = agreement(probabilities, labels)
    assert result["accuracy_per_run"] == [0.75, 0.25, 0.5]
    assert result["errors_per_run"] == [1, 3, 2]
    assert result["sentences_wrong_by_k_runs"] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert (result["wrong_by_every_run"], result["wrong_by_any_run"]) == (1, 3)
    assert every.tolist() == [False, True, False, False]
    # The vote: sentence 2 (0 twice) is wrong; sentence 3 has one vote each for 2, 1 and 0, and the tie
    # goes to the first run's 2, right; sentence 4 (0 twice) is right.
    assert result["majority_vote_accuracy"] == 0.75
    # The mean probability: on sentence 3 the first run's 0.9 outweighs the others' 0.6 each.
    assert result["mean_probability_ensemble_accuracy"] == 0.75


def test_agreement_of_runs_on_disk(evaluated, small_massive, tmp_path, capsys):
    """A run agrees with a copy of itself on every sentence: the ensemble is the run, and every
    error is made by both. Fewer than two runs, or a folder that is not a run, is one line."""
    twin = tmp_path / "twin"
    shutil.copytree(evaluated, twin)
    out = tmp_path / "agreement.json"
    agreement_main([str(evaluated), str(twin), "--data", str(small_massive), "--show", "3", "--out", str(out)])
    result = read_json(out)
    single = result["accuracy_per_run"][0]
    assert result["accuracy_per_run"] == [single, single] and result["n"] == 48
    assert result["mean_probability_ensemble_accuracy"] == result["majority_vote_accuracy"] == single
    errors = result["errors_per_run"][0]
    assert result["wrong_by_every_run"] == result["wrong_by_any_run"] == errors == round((1 - single) * 48)
    assert result["sentences_wrong_by_k_runs"] == {"0": 48 - errors, "1": 0, "2": errors}
    assert len(result["ids_wrong_by_every_run"]) == errors
    assert capsys.readouterr().out.count("gold ") == min(3, errors)
    with pytest.raises(SystemExit) as e:
        agreement_main([str(evaluated), "--data", str(small_massive)])
    assert e.value.code == 2 and "give two or more RUN_DIRs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        agreement_main([str(evaluated), str(tmp_path / "nowhere"), "--data", str(small_massive)])
    assert "nowhere: no such folder" in e.value.code and "\n" not in e.value.code


def test_weight_changes_measure_the_weight_each_layer_computes_with():
    """A LoRA layer moved by (alpha / r)·B·A, a fully trained one by its own difference; frozen
    layers not at all."""
    import copy

    from minibert.evaluation import weight_changes
    from minibert.lora import apply_lora, lora_modules

    pretrained, _, _ = load_pretrained(str(TINY))
    adapted = copy.deepcopy(pretrained)
    apply_lora(adapted, r=2, alpha=8, targets=("query",))
    torch.manual_seed(0)
    for m in lora_modules(adapted):
        m.lora_B.data.normal_()
    changes = weight_changes(adapted, pretrained)
    for name, change in changes.items():
        before = pretrained.get_submodule(name).weight
        if name.endswith(".query"):
            m = adapted.get_submodule(name)
            assert change == pytest.approx(((m.lora_B @ m.lora_A) * 4).norm().item() / before.norm().item(), rel=1e-5)
        else:
            assert change == 0, name
    trained = copy.deepcopy(pretrained)
    trained.layers[0].output.weight.data.mul_(1.5)  # moved by half its own norm
    assert weight_changes(trained, pretrained)["layers.0.output"] == pytest.approx(0.5, rel=1e-6)


def test_weight_changes_of_an_untrained_run_are_zero(small_massive, tmp_path, capsys):
    run = write_run(tmp_path / "run", load_massive(small_massive))
    evaluate.main([str(run), "--weight-changes"])
    changes = read_json(run / "weight-changes.json")["relative_change"]
    layers = json.loads((TINY / "config.json").read_text())["num_hidden_layers"]
    assert len(changes) == 6 * layers and set(changes.values()) == {0.0}
    assert "attention_output" in capsys.readouterr().out  # the table's columns
