"""What `evaluate.py RUN_DIR` leaves in the run folder agrees with itself, and its figures with a
hand computation.

The run is an untrained classifier on the tiny reference model: its guesses are poor, which is
all these checks need (several labels, plenty of mistakes). Nothing here trains.

The per-label figures, the mistakes most made and the CSV records are also checked on a
hand-made case against plain Python counting, and the JSON of `python -m lab.report --by`
against the committed one and the sample standard deviation by hand; each such check is a small
function that test_planted_bugs_evaluation.py shows failing for a real bug."""

import csv
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from lab import report
from minibert import evaluation
from lab.agreement import agreement
from lab.agreement import main as agreement_main
from minibert.classifier import ScenarioClassifier
from minibert.data import SCENARIOS, Example, encode, load_massive
from minibert.representations import embed
from minibert.evaluation import accuracy_interval, confusion_matrix, label_metrics
from minibert.experiments import TrainConfig
from minibert.runs import read_json, save_model
from minibert.weights import load_pretrained
from tests import cases
from tests.test_train import copy_records

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
    z = embed(model, encode(tokenizer, data.dev, data.label_ids(data.dev), 16))  # (N, H)
    first, last = model.head[0], model.head[2]
    with torch.no_grad():
        first.weight /= z.std(0).mean()
        first.bias.copy_(-first.weight @ z.mean(0))
        torch.nn.init.normal_(last.weight)
        last.bias.zero_()
    folder.mkdir(parents=True)
    save_model(folder, model, tokenizer, SCENARIOS, TrainConfig(max_len=16))
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


# A hand-made split: (gold, predicted) label pairs over five labels. Its confusion matrix is not
# symmetric (4 d → a, none a → d), the mistakes have four different counts (so that their order is
# unique), every gold label is predicted at least once, and no label's precision equals its recall:
# a's is 2/7 and 2/5, b's 1/4 and 1/3, c's 3/5 and 3/4, d's 1/1 and 1/5. e is in neither.
NAMES = ["a", "b", "c", "d", "e"]
HAND_PAIRS = [(0, 0)] * 2 + [(0, 1)] * 3 + [(1, 1)] + [(1, 2)] * 2 + [(2, 2)] * 3 + [(2, 0)] + [(3, 3)] + [(3, 0)] * 4


def hand_case():
    """→ logits (N, 5), gold labels (N,). Each row's predicted label has the largest logit, the
    next label a close second, the others far behind: its softmax probability is 0.57 to 0.66,
    the sigmoid of its logit 0.88 to 0.92."""
    logits = torch.full((len(HAND_PAIRS), len(NAMES)), -1.0)
    for row, (_, predicted) in enumerate(HAND_PAIRS):
        logits[row, predicted] = 2.0 + 0.1 * (row % 5)
        logits[row, (predicted + 1) % len(NAMES)] = 1.5
    return logits, torch.tensor([gold for gold, _ in HAND_PAIRS])


def check_confused_pairs():
    """The mistakes most made, gold → predicted, are those plain counting finds, most frequent first."""
    logits, labels = hand_case()
    mistakes = {}
    for gold, predicted in HAND_PAIRS:
        if gold != predicted:
            mistakes[gold, predicted] = mistakes.get((gold, predicted), 0) + 1
    by_hand = [{"true": NAMES[gold], "predicted": NAMES[predicted], "count": count}
               for (gold, predicted), count in sorted(mistakes.items(), key=lambda kv: -kv[1])]
    assert [pair["count"] for pair in by_hand] == [4, 3, 2, 1]
    assert evaluation.confused_pairs(logits, labels, NAMES) == by_hand
    assert evaluation.confused_pairs(logits, labels, NAMES, top=2) == by_hand[:2]


# per_label_accuracy is a float32 mean of 0s and 1s: within 1e-7 of the fraction. Precision in
# its place moves every label by 0.08 or more here.
PER_LABEL_TOL = 1e-6


def per_label_accuracy_error():
    """Largest |difference| between per_label_accuracy and each gold label's share of its
    sentences predicted right, counted by hand; the labels must be the gold labels present."""
    logits, labels = hand_case()
    gold_count, right = {}, {}
    for gold, predicted in HAND_PAIRS:
        gold_count[gold] = gold_count.get(gold, 0) + 1
        right[gold] = right.get(gold, 0) + (gold == predicted)
    by_hand = {NAMES[i]: right[i] / gold_count[i] for i in gold_count}
    result = evaluation.per_label_accuracy(logits, labels, NAMES)
    assert set(result) == set(by_hand)
    return max(abs(result[name] - by_hand[name]) for name in by_hand)


def write_hand_records(folder):
    """evaluate.py's CSV records of the hand-made split, written to `folder` → (predictions rows,
    confusion rows), each without its header."""
    logits, labels = hand_case()
    examples = [Example(f"sentence {row}", "alarm", "alarm_set", str(row)) for row in range(len(HAND_PAIRS))]
    evaluate.write_split_records(folder, "dev", examples, logits, labels, NAMES)
    return read_csv(folder / "predictions-dev.csv")[1:], read_csv(folder / "confusion-dev.csv")[1:]


def check_confusion_csv(folder):
    """confusion-dev.csv holds the counts of the hand-made pairs, rows gold and columns predicted."""
    counts = [[0] * len(NAMES) for _ in NAMES]
    for gold, predicted in HAND_PAIRS:
        counts[gold][predicted] += 1
    _, rows = write_hand_records(folder)
    assert rows == [[name, *map(str, row)] for name, row in zip(NAMES, counts)]


# The probability column is written with 4 decimals: within 5e-5 of the exact value, plus float32's
# 1e-7. A sigmoid in place of the softmax moves it by 0.3 here.
PROBABILITY_TOL = 5e-5 + 1e-6


def probability_error(folder):
    """Largest |difference| between predictions-dev.csv's probability column and the softmax
    probability of the predicted label, exp(l_p) / Σ exp(l_j), by hand in float64; its gold and
    predicted columns must be the hand-made pairs'."""
    logits, _ = hand_case()
    rows, _ = write_hand_records(folder)
    assert [(row[2], row[3]) for row in rows] == [(NAMES[g], NAMES[p]) for g, p in HAND_PAIRS]
    worst = 0.0
    for row, (_, predicted) in zip(rows, HAND_PAIRS):
        values = logits[int(row[0])].tolist()
        top = max(values)
        softmax = math.exp(values[predicted] - top) / sum(math.exp(v - top) for v in values)
        worst = max(worst, abs(float(row[4]) - softmax))
    return worst


def test_most_confused_are_gold_then_predicted():
    check_confused_pairs()


def test_per_label_accuracy_is_the_share_of_each_gold_label_right():
    assert per_label_accuracy_error() < PER_LABEL_TOL


def test_records_of_a_split_hold_the_softmax_and_the_counts(tmp_path):
    check_confusion_csv(tmp_path)
    assert probability_error(tmp_path) < PROBABILITY_TOL


# `report --by` only averages stored accuracies: the same code on the same records gives the same
# bits. The tolerance allows another order of summation; a population std in place of the sample
# one is off by 1 - √(2/3), 18 %, with three seeds an arm.
REPORT_TOL = 1e-12


def regenerate_bucketing(to, monkeypatch):
    """The lab notebook's bucketing command (without --readme), run in `to` on copies of the
    committed records → (the JSON it writes, the committed JSON)."""
    text = (ROOT / "lab" / "README.md").read_text()
    block = text.split("<!-- by-bucket:start -->", 1)[1]
    argv = shlex.split(block.split("<!-- generated by `", 1)[1].split("` -->", 1)[0])[3:]
    if "--readme" in argv:
        del argv[argv.index("--readme"):argv.index("--readme") + 2]
    for folder in argv[:argv.index("--by")]:
        copy_records(folder, to)
    monkeypatch.chdir(to)
    report.main(argv)
    out = Path(argv[argv.index("--out") + 1]).with_suffix(".json")
    return json.loads((to / out).read_text()), json.loads((ROOT / out).read_text())


def largest_relative_difference(ours, committed, where="record"):
    """Between two JSON values of the same shape: the largest relative difference of their floats;
    every key, string, integer and length must be equal."""
    if isinstance(committed, list):
        assert len(ours) == len(committed), where
        ours, committed = dict(enumerate(ours)), dict(enumerate(committed))
    if isinstance(committed, dict):
        assert set(ours) == set(committed), where
        return max((largest_relative_difference(ours[k], committed[k], f"{where}/{k}") for k in committed),
                   default=0.0)
    if isinstance(committed, float):
        return abs(ours - committed) / abs(committed)
    assert ours == committed, where
    return 0.0


def bucketing_json_error(to, monkeypatch):
    """Largest relative difference between the regenerated bucketing JSON and the committed one."""
    ours, committed = regenerate_bucketing(to, monkeypatch)
    return largest_relative_difference(ours, committed)


def bucketing_std_error(to, monkeypatch):
    """Largest relative difference between each arm's [mean, std] of dev and test accuracy in the
    regenerated JSON and, by hand from its runs' records, the mean and the sample standard
    deviation √(Σ (x - mean)² / (n - 1))."""
    ours, _ = regenerate_bucketing(to, monkeypatch)
    worst = 0.0
    for arms in ours.values():
        for arm in arms.values():
            records = [json.loads((to / run / "results.json").read_text()) for run in arm["run_dirs"]]
            for split in ("dev", "test"):
                values = [record[split]["accuracy"] for record in records]
                mean = sum(values) / len(values)
                std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
                worst = max(worst, abs(arm[split][0] - mean) / mean, abs(arm[split][1] - std) / std)
    return worst


def test_report_by_bucket_json_is_the_committed_one(tmp_path, monkeypatch):
    assert bucketing_json_error(tmp_path / "json", monkeypatch) <= REPORT_TOL
    assert bucketing_std_error(tmp_path / "std", monkeypatch) <= REPORT_TOL
