"""Labelled sentences of your own: a CSV, TSV or JSONL with its own columns and labels trains and
evaluates end to end; MASSIVE read through that path trains exactly as MASSIVE does; the Python
API gives evaluate.py's numbers; every bad file or flag is refused in one line."""

import csv
import json
from pathlib import Path

import pytest
import torch

import evaluate
import minibert
import train
from lab import agreement
from minibert.data import Source, load_data
from minibert.runs import read_json
from tests import cases
from tests.test_bad_input import one_line_exit

TINY = ["--model", str(cases.REFERENCE / "tiny_odd"), "--max-len", "16", "--log-every", "100"]
RENAMED = {"alarm": "wake-up", "weather": "sky", "music": "tunes", "cooking": "kitchen"}


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def massive_records(massive_path):
    return [json.loads(line) for line in massive_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def own_rows(massive_records):
    """Four of MASSIVE's dev scenarios under names minibert has never seen: (sentence, topic) rows."""
    return [(r["utt"], RENAMED[r["scenario"]]) for r in massive_records
            if r["partition"] == "dev" and r["scenario"] in RENAMED]


@pytest.fixture(scope="module")
def massive_slice(massive_records, tmp_path_factory):
    """Every scenario in every split (4 train, 2 dev, 2 test sentences each), as MASSIVE's JSONL and
    as a CSV of other column names: the same sentences, lines and order."""
    per, seen, kept = {"train": 4, "dev": 2, "test": 2}, {}, []
    for r in massive_records:
        key = (r["partition"], r["scenario"])
        if seen.get(key, 0) < per[r["partition"]]:
            seen[key] = seen.get(key, 0) + 1
            kept.append(r)
    folder = tmp_path_factory.mktemp("slice")
    (folder / "slice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    write_csv(folder / "slice.csv", ["utt", "scenario", "partition", "note"],
              [[r["utt"], r["scenario"], r["partition"], "a, quoted field"] for r in kept])
    return folder


def without_clock(row):
    return {k: v for k, v in row.items() if not k.endswith(("seconds", "per_second"))}


def test_massive_through_the_csv_path_trains_exactly_as_massive(massive_slice, tmp_path):
    runs = {}
    for name, data in (("jsonl", ["--data", str(massive_slice / "slice.jsonl")]),
                       ("csv", ["--data", str(massive_slice / "slice.csv"), "--text-column", "utt",
                                "--label-column", "scenario", "--split-column", "partition"])):
        runs[name] = train.main([*TINY, *data, "--epochs", "2", "--out", str(tmp_path / name)])
    rows = {name: [without_clock(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for name, run in runs.items()}
    assert rows["jsonl"] == rows["csv"] and len(rows["csv"]) == 2
    results = {name: read_json(run / "results.json") for name, run in runs.items()}
    assert results["jsonl"]["test"] == results["csv"]["test"] and results["jsonl"]["dev"] == results["csv"]["dev"]
    assert results["csv"]["data"]["split"] == {"column": "partition"}
    assert results["csv"]["data"]["sizes"] == results["jsonl"]["data"]["sizes"] == {"train": 72, "dev": 36,
                                                                                     "test": 36}
    assert read_json(runs["csv"] / "model.json")["labels"] == read_json(runs["jsonl"] / "model.json")["labels"]


def test_a_csv_of_new_labels_without_a_split_trains_and_evaluates(own_rows, tmp_path, capsys, monkeypatch):
    data = write_csv(tmp_path / "own.csv", ["sentence", "topic"], own_rows)
    flags = ["--data", str(data), "--text-column", "sentence", "--label-column", "topic"]
    monkeypatch.chdir(tmp_path)  # no --out: the run goes to its default folder, named after the file
    run = train.main([*TINY, *flags, "--epochs", "1"])
    assert run == Path("runs/baseline-tiny_odd-own-s0")
    results, meta = read_json(run / "results.json"), read_json(run / "model.json")
    assert meta["labels"] == sorted(RENAMED.values()) and meta["label_kind"] == "topic"
    sizes = results["data"]["sizes"]
    assert results["data"]["split"] == {"seed": 0, "dev_fraction": 0.1, "test_fraction": 0.1}
    assert sum(sizes.values()) == len(own_rows) and abs(sizes["test"] - 0.1 * len(own_rows)) <= len(RENAMED)
    evaluate.main([str(run), *flags, "--split", "test"])
    assert read_json(run / "eval-test.json")["accuracy"] == results["test"]["accuracy"]
    with open(run / "predictions-test.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == sizes["test"] and {p["gold"] for p in predicted} == set(RENAMED.values())
    # The Python API gives evaluate.py's numbers, sentence by sentence.
    clf = minibert.load_run(run, device="cpu")
    labels, probabilities = clf.predict([p["utterance"] for p in predicted], batch_size=7)
    assert labels == [p["predicted"] for p in predicted]
    assert probabilities.shape == (len(predicted), len(RENAMED))
    assert torch.allclose(probabilities.sum(1), torch.ones(len(predicted)))
    assert probabilities.max(1).values.tolist() == pytest.approx([float(p["probability"]) for p in predicted],
                                                                  abs=6e-5)  # the CSV's 4 decimals
    evaluate.main([str(run), "--predict", predicted[0]["utterance"]])
    assert capsys.readouterr().out.strip().endswith(f"{labels[0]} ({probabilities[0].max():.3f})")


def test_a_run_on_data_of_your_own_is_evaluated_on_that_data_only(own_rows, tmp_path, capsys):
    """Without --data (MASSIVE), or on another split of the file, evaluate.py and --embeddings refuse."""
    data = write_csv(tmp_path / "own.csv", ["sentence", "topic"], own_rows)
    flags = ["--data", str(data), "--text-column", "sentence", "--label-column", "topic"]
    run = train.main([*TINY, *flags, "--epochs", "1", "--out", str(tmp_path / "run"), "--no-test"])
    for extra in ([], ["--embeddings"]):
        line = one_line_exit(evaluate.main, [str(run), *extra], capsys)
        assert "was trained on data of your own (labels from its column 'topic'), not on MASSIVE" in line, line
        line = one_line_exit(evaluate.main, [str(run), *flags, "--split-seed", "1", *extra], capsys)
        assert "splits other sentences into train, dev and test than the run's" in line, line
    # The lab's agreement reads the runs' own data too, under the same checks.
    twin = train.main([*TINY, *flags, "--epochs", "1", "--seed", "1", "--out", str(tmp_path / "twin"), "--no-test"])
    out = tmp_path / "agreement.json"
    agreement.main([str(run), str(twin), *flags, "--split", "dev", "--out", str(out)])
    assert read_json(out)["n"] == read_json(run / "results.json")["data"]["sizes"]["dev"]
    line = one_line_exit(agreement.main, [str(run), str(twin)], capsys)
    assert "was trained on data of your own (labels from its column 'topic'), not on MASSIVE" in line, line


def test_the_split_is_stratified_and_fixed_by_its_seed(own_rows, tmp_path):
    path = write_csv(tmp_path / "own.csv", ["text", "label"], own_rows)
    data = load_data(Source(str(path)))
    for name in ("dev", "test"):
        for label in RENAMED.values():
            share = sum(e.label == label for e in data.split(name)) / len(data.split(name))
            overall = sum(row[1] == label for row in own_rows) / len(own_rows)
            assert abs(share - overall) < 0.05, (name, label)
    assert load_data(Source(str(path))) == data
    other = load_data(Source(str(path), split_seed=1))
    assert other.test != data.test and sorted(map(str, other.test)) != sorted(map(str, data.test))
    # Every sentence lands in exactly one split.
    texts = sorted(e.text for name in ("train", "dev", "test") for e in data.split(name))
    assert texts == sorted(row[0] for row in own_rows)


def test_tsv_jsonl_and_split_files_read_the_same_rows(own_rows, tmp_path):
    csv_data = load_data(Source(str(write_csv(tmp_path / "a.csv", ["text", "label"], own_rows))))
    tsv_data = load_data(Source(str(write_csv(tmp_path / "a.tsv", ["text", "label"], own_rows, "\t"))))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in own_rows))
    jsonl_data = load_data(Source(str(tmp_path / "a.jsonl")))
    strip = lambda d: [(e.text, e.label) for e in d.train + d.dev + d.test]  # noqa: E731
    assert strip(csv_data) == strip(tsv_data) == strip(jsonl_data)
    third = len(own_rows) // 3
    files = [write_csv(tmp_path / f"{name}.csv", ["text", "label"], rows)
             for name, rows in (("train", own_rows[:third]), ("dev", own_rows[third:2 * third]),
                                ("test", own_rows[2 * third:]))]
    split = load_data(Source(str(files[0]), dev_data=str(files[1]), test_data=str(files[2])))
    assert [e.text for e in split.dev] == [t for t, _ in own_rows[third:2 * third]]
    assert split.labels == tuple(sorted(RENAMED.values()))


def test_quotes_in_a_sentence_are_read_as_written(tmp_path):
    """A quote inside a field is text; a field quoted whole (as csv writers quote one that holds a
    quote, the delimiter or a line break) is read back exactly, in a CSV and in a TSV."""
    rows = [['say "hi" to mom', "call"], ['"Play" it loud', "music"], ["tab\there, comma", "music"],
            ['two\nlines "quoted"', "call"]] * 3
    for name, sep in (("q.csv", ","), ("q.tsv", "\t")):
        data = load_data(Source(str(write_csv(tmp_path / name, ["text", "label"], rows, sep))))
        read = sorted((e.text, e.label) for e in data.train + data.dev + data.test)
        assert read == sorted(tuple(r) for r in rows), name
    (tmp_path / "raw.csv").write_text("text,label\n" + 'say "hi" to mom,call\nplay it,music\n' * 10)
    data = load_data(Source(str(tmp_path / "raw.csv")))
    assert {e.text for e in data.train + data.dev + data.test} == {'say "hi" to mom', "play it"}


GOOD = [["wake me up at seven", "alarm"], ["is it raining", "weather"], ["set an alarm", "alarm"],
        ["sunny tomorrow", "weather"]] * 5


def bad_case(tmp_path, name):
    """→ (train.py argv of data flags, what the one line must say) for the bad input `name`."""
    path = tmp_path / "data.csv"
    header, rows, flags = ["text", "label"], [list(r) for r in GOOD], []
    if name == "no-such-column":
        flags, expect = ["--label-column", "topic"], "no column 'topic' (its columns: text, label); pass --label-column"
    elif name == "short-row":
        rows[3] = ["only text"]
        expect = f"{path}:5: 1 fields, the header has 2"
    elif name == "empty-label":
        rows[6][1] = " "
        expect = f"{path}:8: column 'label' (--label-column) is ' ', not a non-empty string"
    elif name == "bad-split":
        header, rows = ["text", "label", "split"], [[*r, "train"] for r in rows]
        rows[2][2] = "validation"
        flags, expect = ["--split-column", "split"], f"{path}:4: column 'split' is 'validation'; expected one of"
    elif name == "label-unseen-in-train":
        header, rows = ["text", "label", "split"], [[*r, ("train", "dev", "test", "train")[i % 4]]
                                                    for i, r in enumerate(rows)]
        rows[2] = ["play jazz", "music", "test"]
        flags, expect = ["--split-column", "split"], "the test split has label 'music', which no train sentence has"
    elif name == "one-label":
        rows = [[text, "alarm"] for text, _ in rows]
        expect = "one label ('alarm') in the train split"
    elif name == "not-utf8":
        path.write_bytes("text,label\ncafé,alarm\n".encode("latin-1"))
        return ["--data", str(path)], f"{path}:2: not UTF-8 text (byte 4 of the line)"
    elif name == "dev-without-test":
        flags, expect = ["--dev-data", str(path)], "--dev-data and --test-data go together"
    elif name == "column-and-files":
        header, rows = ["text", "label", "split"], [[*r, "train"] for r in rows]
        flags = ["--split-column", "split", "--dev-data", str(path), "--test-data", str(path)]
        expect = "--dev-data and --test-data with --split-column split"
    elif name == "fractions":
        flags, expect = ["--dev-fraction", "0.5", "--test-fraction", "0.5"], "together below 1"
    elif name == "intents":
        flags, expect = ["--supervise", "intents"], "--supervise intents: MASSIVE's intents, which this data"
    elif name == "intent-labels":
        flags, expect = ["--labels", "intent"], "--labels intent: MASSIVE's intents"
    elif name == "duplicate-header":
        header = ["text", "label", "label"]
        rows = [[*r, "x"] for r in rows]
        expect = f"{path}:1: the header names column 'label' twice"
    elif name == "quoted-newline":
        rows[1] = ["two\nlines", "alarm"]
        rows[4] = ["too", "many", "fields"]
        expect = f"{path}:7: 3 fields"  # the header, a row, two lines of one row, two rows, then it
    elif name == "open-quote":
        path.write_text('text,label\n"' + "never closed " * 11_000 + ",alarm\n")
        return ["--data", str(path)], f"{path}:2: unexpected end of data; a quote left open?"
    elif name in ("quote-then-text", "tsv-quote-then-text"):
        path = tmp_path / ("data.tsv" if name.startswith("tsv") else "data.csv")
        sep = "\t" if name.startswith("tsv") else ","
        path.write_text("".join(f"{t}{sep}{y}\n" for t, y in [("text", "label"), *GOOD[:3], ('"Play" it loud', "music"),
                                                             *GOOD[3:]]))
        return ["--data", str(path)], f"{path}:5: a field starts with a quote that closes before its end"
    elif name == "quote-at-the-end":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in GOOD) + '"never closed,alarm\n')
        return ["--data", str(path)], f"{path}:22: unexpected end of data; a quote left open?"
    elif name == "same-column-twice":
        flags, expect = ["--label-column", "text"], ("--text-column text (its default) and --label-column text name "
                                                      "the same column")
    elif name == "split-column-is-the-label":
        flags, expect = ["--split-column", "label"], "--label-column label (its default) and --split-column label"
    elif name == "empty-split-column":
        flags, expect = ["--split-column", ""], "--split-column '': empty; name a column"
    elif name == "empty-split-files":
        flags, expect = ["--dev-data", "", "--test-data", ""], "--dev-data '': empty; name a file"
    elif name == "json-suffix":
        path = tmp_path / "data.json"
        path.write_text('{"text": "a", "label": "x"}\n')
        return ["--data", str(path)], "name the file .csv, .tsv or .jsonl"
    elif name == "seed-with-column":
        header, rows = ["text", "label", "split"], [[*r, "train"] for r in rows]
        flags, expect = ["--split-column", "split", "--split-seed", "3"], "--split-seed applies to a random split"
    elif name == "contrastive-intents":
        flags = ["--experiment", "supcon", "--contrastive-labels", "intents"]
        expect = "--contrastive-labels intents: MASSIVE's intents"
    elif name == "column-without-data":
        return ["--text-column", "sentence"], "--text-column: an option of data of your own; pass the file with --data"
    elif name == "jsonl-line":
        path = tmp_path / "data.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
        return ["--data", str(path)], f"{path}:2: not valid JSON"
    write_csv(path, header, rows)
    return ["--data", str(path), *flags], expect


@pytest.mark.parametrize("name", ["no-such-column", "short-row", "empty-label", "bad-split", "label-unseen-in-train",
                                  "one-label", "not-utf8", "dev-without-test", "column-and-files", "fractions",
                                  "intents", "intent-labels", "jsonl-line", "column-without-data", "duplicate-header",
                                  "quoted-newline", "open-quote", "json-suffix", "seed-with-column",
                                  "contrastive-intents", "quote-then-text", "tsv-quote-then-text",
                                  "quote-at-the-end", "same-column-twice", "split-column-is-the-label",
                                  "empty-split-column", "empty-split-files"])
def test_bad_own_data_is_one_line(name, tmp_path, capsys):
    flags, expect = bad_case(tmp_path, name)
    line = one_line_exit(train.main, [*TINY, *flags, "--out", str(tmp_path / "run")], capsys)
    assert expect in line, line
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_sentence_longer_than_the_csv_modules_field_limit_reads_as_in_jsonl(tmp_path):
    """csv's default field limit (131,072 characters) is no limit of a sentence: the CSV reads as
    the JSONL of the same rows does (the tokenizer keeps the first --max-len word-pieces)."""
    rows = [["wake " * 30_000 + "up", "alarm"], *GOOD]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    read = [load_data(Source(str(path))) for path in (write_csv(tmp_path / "long.csv", ["text", "label"], rows),
                                                      tmp_path / "long.jsonl")]
    texts = [[(e.text, e.label) for e in data.train + data.dev + data.test] for data in read]
    assert texts[0] == texts[1] and max(len(text) for text, _ in texts[0]) == len(rows[0][0])


def test_a_massive_file_refuses_the_options_of_your_own_data(massive_slice, tmp_path, capsys):
    line = one_line_exit(train.main, [*TINY, "--data", str(massive_slice / "slice.jsonl"), "--split-seed", "2",
                                      "--out", str(tmp_path / "run")], capsys)
    assert "--split-seed with --data" in line and "a MASSIVE file" in line


def test_jsonl_of_your_own_reads_what_json_writes(tmp_path):
    """A byte-order mark, and U+2028 inside a string, which json.dumps(ensure_ascii=False) writes raw."""
    rows = [("line\u2028separator", "a"), ("café", "b")] * 10
    path = tmp_path / "own.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n"
                                       for t, y in rows), encoding="utf-8")
    data = load_data(Source(str(path)))
    assert sorted(e.text for e in data.train + data.dev + data.test) == sorted(t for t, _ in rows)


def test_an_interrupted_run_is_not_resumed_on_an_edited_file(own_rows, tmp_path, capsys, monkeypatch):
    """The same file name and flags, other sentences: the checkpoint's digest of the split refuses it."""
    from tests.test_train import stop_after_first_epoch

    data = write_csv(tmp_path / "own.csv", ["text", "label"], own_rows)
    out = ["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "2"]
    stop_after_first_epoch(monkeypatch)
    with pytest.raises(SystemExit, match="interrupted"):
        train.main([*TINY, *out])
    monkeypatch.undo()
    write_csv(data, ["text", "label"], [(text + " please", label) for text, label in own_rows])
    line = one_line_exit(train.main, [*TINY, *out, "--resume"], capsys)
    assert f"cannot resume {tmp_path / 'run'}: {data} no longer holds the sentences it started on" in line, line
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    write_csv(data, ["text", "label"], own_rows)  # put back: the run goes on
    assert train.main([*TINY, *out, "--resume"]) == tmp_path / "run"


def test_a_run_folder_is_resumed_only_on_its_own_data(own_rows, tmp_path, capsys):
    first = write_csv(tmp_path / "first.csv", ["text", "label"], own_rows)
    second = write_csv(tmp_path / "second.csv", ["text", "label"], own_rows[::-1])
    out = ["--out", str(tmp_path / "run"), "--epochs", "1"]
    train.main([*TINY, "--data", str(first), *out])
    line = one_line_exit(train.main, [*TINY, "--data", str(second), *out, "--resume"], capsys)
    assert "cannot resume" in line and "on other data" in line and "first.csv" in line
    line = one_line_exit(train.main, [*TINY, "--data", str(first), "--split-seed", "1", *out, "--resume"], capsys)
    assert "on other data" in line
    # evaluate.py reads the split the run trained on, or refuses.
    run = tmp_path / "run"
    line = one_line_exit(evaluate.main, [str(run), "--data", str(first), "--split-seed", "1"], capsys)
    assert "splits other sentences into train, dev and test than the run's" in line and "first.csv" in line
    evaluate.main([str(run), "--data", str(first)])
    assert read_json(run / "eval-test.json")["accuracy"] == read_json(run / "results.json")["test"]["accuracy"]
