"""Every bad input ends in one line that says what is wrong, where, and what to do: a non-zero
exit status, one line on stderr, no traceback. Each case runs the real command in a process.

Flag cases also pass a model that does not exist: the flag's message, not the model's, proves
that the configuration is checked before anything loads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import minibert
import train
from lab import paper, tune
from minibert import training
from minibert.classifier import ScenarioClassifier
from minibert.data import Source, describe, load_data
from minibert.experiments import FIELDS, FLAGS, MAX_SEED, PRESETS, TrainConfig, flag
from minibert.runs import read_json, save_model
from minibert.weights import load_pretrained
from tests import cases

ROOT = Path(__file__).resolve().parents[1]
TINY = cases.REFERENCE / "tiny_odd"  # max_position_embeddings 16
NO_MODEL = ["--model", "/nonexistent/model"]
LINE = {"id": "0", "locale": "en-US", "partition": "train", "scenario": "alarm", "intent": "alarm_set",
        "utt": "wake me up at five am"}


def own_jsonl(line_2):
    """Two labelled sentences of your own, the second line given as bytes."""
    return b'{"text": "wake me up", "label": "alarm"}\n' + line_2 + b"\n"


# A results.json as train.py writes it, and a model.json whose max_len is text.
RECORD = (ROOT / "results/paper/all-MiniLM-L6-v2-e10/baseline-s0/results.json").read_text()
MODEL_JSON = json.dumps({"format": "minibert-run/1", "model": "tiny", "encoder": {}, "labels": ["alarm", "audio"],
                         "label_kind": "scenario", "hidden_dim": 10, "drop_rate": 0.9, "max_len": "16", "lora": None})


def jsonl(*replaced):
    """A three-line MASSIVE file (train, dev, test) with line 2 replaced, if given."""
    lines = [json.dumps({**LINE, "partition": p}) for p in ("train", "dev", "test")]
    if replaced:
        lines[1] = replaced[0]
    return "\n".join(lines) + "\n"


TRAIN = [sys.executable, "train.py"]
EVALUATE = [sys.executable, "evaluate.py"]
MINIBERT = [sys.executable, "-m", "minibert"]
REPORT, CURVES, TUNE, AGREEMENT = ([sys.executable, "-m", f"lab.{name}"] for name in ("report", "curves", "tune",
                                                                                      "agreement"))
ON_TINY = ["--model", "{tmp}/model", "--out", "{tmp}/out", "--epochs", "1"]
DATA = "{tmp}/good.jsonl"

# (name, argv, {file under tmp: content}, {environment}, what the line must say). In argv, {tmp} is
# a fresh folder holding a copy of the tiny model in model/ and a good MASSIVE file good.jsonl;
# {run} is a finished run folder.
CASES = [
    # ---- train.py flags: checked before anything loads ----
    ("epochs", [*TRAIN, *NO_MODEL, "--epochs", "0"], {}, {}, "--epochs 0: must be at least 1"),
    ("batch-size", [*TRAIN, *NO_MODEL, "--batch-size", "0"], {}, {}, "--batch-size 0"),
    ("lr-zero", [*TRAIN, *NO_MODEL, "--lr", "0"], {}, {}, "--lr 0.0: must be a finite number above 0"),
    ("lr-nan", [*TRAIN, *NO_MODEL, "--lr", "nan"], {}, {}, "--lr nan"),
    ("max-len-short", [*TRAIN, *NO_MODEL, "--max-len", "2"], {}, {}, "--max-len 2: must be at least 3"),
    ("drop-rate", [*TRAIN, *NO_MODEL, "--drop-rate", "1"], {}, {}, "--drop-rate 1.0"),
    ("hidden-dim", [*TRAIN, *NO_MODEL, "--hidden-dim", "0"], {}, {}, "--hidden-dim 0"),
    ("temperature", [*TRAIN, *NO_MODEL, "--experiment", "supcon", "--temperature", "0"], {}, {}, "--temperature 0.0"),
    ("adam-eps", [*TRAIN, *NO_MODEL, "--adam-eps", "0"], {}, {}, "--adam-eps 0.0"),
    ("weight-decay", [*TRAIN, *NO_MODEL, "--weight-decay", "-0.1"], {}, {}, "--weight-decay -0.1"),
    ("max-grad-norm", [*TRAIN, *NO_MODEL, "--max-grad-norm", "-1"], {}, {}, "--max-grad-norm -1.0"),
    ("lora-r", [*TRAIN, *NO_MODEL, "--lora-r", "-1"], {}, {}, "--lora-r -1"),
    ("lora-alpha", [*TRAIN, *NO_MODEL, "--lora-r", "4", "--lora-alpha", "0"], {}, {}, "--lora-alpha 0.0"),
    ("lora-dropout", [*TRAIN, *NO_MODEL, "--lora-r", "4", "--lora-dropout", "1"], {}, {}, "--lora-dropout 1.0"),
    ("lora-targets", [*TRAIN, *NO_MODEL, "--lora-r", "4", "--lora-targets", "query, vlaue"], {}, {},
     "no Linear module is named vlaue"),
    ("swa-anneal", [*TRAIN, *NO_MODEL, "--swa", "--swa-anneal-epochs", "0"], {}, {}, "--swa-anneal-epochs 0"),
    ("swa-start", [*TRAIN, *NO_MODEL, "--swa", "--swa-start", "1"], {}, {}, "--swa-start 1.0"),
    ("warmup-ratio", [*TRAIN, *NO_MODEL, "--warmup-ratio", "1"], {}, {}, "--warmup-ratio 1.0"),
    ("warmup-both", [*TRAIN, *NO_MODEL, "--experiment", "best", "--warmup-steps", "100"], {}, {},
     "pass --warmup-ratio 0 or --warmup-steps 0"),
    ("loss-without-stage", [*TRAIN, *NO_MODEL, "--loss", "supcon"], {}, {}, "pass --contrastive-epochs N"),
    ("world-over-batch", [*TRAIN, *NO_MODEL, "--batch-size", "2"], {}, {"WORLD_SIZE": "4"},
     "--batch-size 2 is smaller than the 4 processes"),
    ("not-a-number", [*TRAIN, *NO_MODEL, "--epochs", "three"], {}, {}, "--epochs"),
    ("max-len-above-model", [*TRAIN, *ON_TINY, "--data", DATA, "--max-len", "17"], {}, {}, "--max-len 17"),
    ("swa-averages-nothing", [*TRAIN, *NO_MODEL, "--experiment", "swa", "--epochs", "4"], {}, {},
     "averages no epoch"),
    ("select-with-swa", [*TRAIN, *NO_MODEL, "--experiment", "swa", "--select", "dev-best"], {}, {},
     "--select dev-best with --swa"),
    ("fast-with-fp16", [*TRAIN, *NO_MODEL, "--device", "cpu", "--fast", "--precision", "fp16"], {}, {},
     "--fast cannot run with --precision fp16"),
    ("contrastive-drop-rate-without-stage", [*TRAIN, *NO_MODEL, "--contrastive-drop-rate", "0.1"], {}, {},
     "--contrastive-drop-rate 0.1 without a contrastive stage"),
    ("contrastive-drop-rate-above-one", [*TRAIN, *NO_MODEL, "--experiment", "simclr", "--contrastive-drop-rate", "1"],
     {}, {}, "--contrastive-drop-rate 1.0: must be at least 0 and below 1"),
    ("compile-on-cpu", [*TRAIN, *NO_MODEL, "--device", "cpu", "--compile"], {}, {},
     "--compile works on a GPU's fast path only"),
    ("layer-decay-zero", [*TRAIN, *NO_MODEL, "--layer-decay", "0"], {}, {}, "--layer-decay 0.0: must be above 0"),
    ("layer-decay-above-one", [*TRAIN, *NO_MODEL, "--layer-decay", "1.5"], {}, {}, "--layer-decay 1.5"),
    ("rdrop-negative", [*TRAIN, *NO_MODEL, "--rdrop", "-1"], {}, {}, "--rdrop -1.0: must be a finite number"),
    ("rdrop-inf", [*TRAIN, *NO_MODEL, "--rdrop", "inf"], {}, {}, "--rdrop inf"),
    ("supervise-intents-of-intents", [*TRAIN, *NO_MODEL, "--labels", "intent", "--supervise", "intents"], {}, {},
     "--supervise intents with --labels intent"),
    ("contrastive-labels-without-supcon", [*TRAIN, *NO_MODEL, "--experiment", "simclr", "--contrastive-labels",
                                           "intents"], {}, {}, "--contrastive-labels intents with --loss simclr"),
    ("world-size-not-a-number", [*TRAIN, *NO_MODEL], {}, {"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ("world-size-without-torchrun", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA], {}, {"WORLD_SIZE": "2"},
     "start several processes with torchrun"),
    ("out-inside-a-file", [*TRAIN, "--model", "{tmp}/model", "--max-len", "16", "--data", DATA,
                           "--out", "{tmp}/good.jsonl/run"], {}, {}, "good.jsonl/run"),
    ("resume-damaged-checkpoint", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA, "--resume"],
     {"out/checkpoint.safetensors": b"\x00" * 10}, {}, "checkpoint.safetensors: not a training checkpoint"),
    # ---- the data file ----
    ("data-missing", [*TRAIN, *ON_TINY, "--data", "{tmp}/nowhere.jsonl"], {}, {}, "nowhere.jsonl: no MASSIVE data"),
    ("data-folder", [*TRAIN, *ON_TINY, "--data", "{tmp}/model"], {}, {}, "model: a folder, not a file"),
    ("data-empty", [*TRAIN, *ON_TINY, "--data", "{tmp}/empty.jsonl"], {"empty.jsonl": ""}, {},
     "empty.jsonl: no train examples"),
    ("data-not-utf8", [*TRAIN, *ON_TINY, "--data", "{tmp}/bad.jsonl"],
     {"bad.jsonl": jsonl().encode().replace(b'"dev"', b'"d\xe9v"')}, {}, "bad.jsonl:2: not UTF-8"),
    ("data-malformed", [*TRAIN, *ON_TINY, "--data", "{tmp}/bad.jsonl"], {"bad.jsonl": jsonl('{"utt": ')}, {},
     "bad.jsonl:2: not valid JSON"),
    ("data-partition", [*TRAIN, *ON_TINY, "--data", "{tmp}/bad.jsonl"],
     {"bad.jsonl": jsonl(json.dumps({**LINE, "partition": "validation"}))}, {}, "bad.jsonl:2: unknown partition"),
    ("data-label", [*TRAIN, *ON_TINY, "--data", "{tmp}/bad.jsonl"],
     {"bad.jsonl": jsonl(json.dumps({**LINE, "scenario": "banking"}))}, {}, "bad.jsonl:2: unknown scenario"),
    ("data-zero-shot", [*EVALUATE, "--zero-shot", "--model", "{tmp}/model", "--data", "{tmp}/nowhere.jsonl"], {}, {},
     "nowhere.jsonl: no MASSIVE data"),
    ("data-empty-given", [*TRAIN, *ON_TINY, "--data", "{tmp}/empty.jsonl"], {"empty.jsonl": ""}, {},
     "no train examples (is the file empty or truncated?); pass --data MASSIVE's en-US.jsonl, or a CSV, TSV or JSONL"),
    # ---- a file of your own: its problems in its own words, never MASSIVE's ----
    ("own-jsonl-first-line-not-utf8", [*TRAIN, *ON_TINY, "--data", "{tmp}/own.jsonl"],
     {"own.jsonl": own_jsonl(b'{"text": "b", "label": "x"}').replace(b"wake", b"w\xe9ke")}, {},
     "own.jsonl:1: not UTF-8 text (byte 12 of the line); save the file as UTF-8"),
    ("own-jsonl-second-line-not-utf8", [*TRAIN, *ON_TINY, "--data", "{tmp}/own.jsonl"],
     {"own.jsonl": own_jsonl(b'{"text": "caf\xe9", "label": "x"}')}, {},
     "own.jsonl:2: not UTF-8 text (byte 14 of the line); save the file as UTF-8"),
    # ---- models and their files ----
    ("model-unknown", [*TRAIN, "--model", "bert-large", "--data", DATA], {}, {}, "unknown model 'bert-large'"),
    ("model-is-a-file", [*MINIBERT, "weights", "{tmp}/model/config.json"], {}, {}, "config.json' is a file"),
    ("model-unreachable", [*MINIBERT, "weights", "bert-base-uncased"], {},
     {"HF_ENDPOINT": "http://127.0.0.1:9", "MINIBERT_WEIGHTS_DIR": "{tmp}/weights"}, "bert-base-uncased"),
    ("weights-truncated", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/model.safetensors": (TINY / "model.safetensors").read_bytes()[:50_000]}, {},
     "model.safetensors: not a readable safetensors file"),
    ("config-truncated", [*EVALUATE, "--zero-shot", "--model", "{tmp}/model", "--data", DATA],
     {"model/config.json": (TINY / "config.json").read_text()[:100]}, {}, "config.json: cannot read"),
    ("vocab-of-another-model", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/vocab.txt": (TINY / "vocab.txt").read_text() + "".join(f"extra{i}\n" for i in range(5))}, {},
     "the tokenizer has 104 word-pieces, the config's vocab_size is 99"),
    ("zero-shot-on-a-short-model", [*EVALUATE, "--zero-shot", "--model", "{tmp}/model", "--data", DATA], {}, {},
     "16 positions, fewer than the 20 word-pieces the zero-shot row reads"),
    ("vocab-not-utf8", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/vocab.txt": b"[PAD]\n\xff\xfe\n"}, {}, "vocab.txt: cannot read"),
    ("tokenizer-json-corrupt", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/tokenizer.json": '{"version": "1.0", "trunc'}, {}, "tokenizer.json: not a readable"),
    ("compact-onto-a-file", [*MINIBERT, "weights", "{tmp}/model", "--compact", "{tmp}/model/vocab.txt"], {}, {},
     "--compact"),
    ("compact-onto-a-full-folder", [*MINIBERT, "weights", "{tmp}/model", "--compact", "{tmp}/full"],
     {"full/config.json": "{}"}, {}, "full holds config.json that this command did not write"),
    ("minibert-usage", [*MINIBERT], {}, {}, "command"),
    # ---- evaluate.py: what RUN_DIR is, and flags that do not go with it ----
    ("run-is-a-file", [*EVALUATE, "{tmp}/model/config.json"], {}, {}, "config.json: a file"),
    ("run-not-a-run", [*EVALUATE, "{tmp}/model"], {}, {}, "model.json: missing"),
    ("weight-changes-split", [*EVALUATE, "{run}", "--weight-changes", "--split", "dev"], {}, {}, "--split applies"),
    ("weight-changes-zero-shot", [*EVALUATE, "--zero-shot", "--weight-changes"], {}, {},
     "--weight-changes needs a trained RUN_DIR"),
    ("run-unfinished", [*EVALUATE, "{tmp}/half"], {"half/checkpoint.safetensors": b""}, {}, "has not finished"),
    ("run-model-json-field", [*EVALUATE, "{run}", "--predict", "wake me up"], {"run/model.json": MODEL_JSON}, {},
     "model.json: max_len is '16', not a whole number; the file is damaged"),
    ("run-results-not-an-object", [*EVALUATE, "{run}", "--data", DATA], {"run/results.json": "[1, 2]"}, {},
     "results.json: holds [1, 2], not a JSON object; the file is damaged"),
    ("run-results-field", [*EVALUATE, "{run}", "--data", DATA], {"run/results.json": '{"data": {"file": 3}}'}, {},
     "results.json: data.file is 3, not a string; the file is damaged"),
    ("agreement-results-not-an-object", [*AGREEMENT, "{run}", "{run}", "--data", DATA],
     {"run/results.json": '"done"'}, {}, "results.json: holds 'done', not a JSON object"),
    ("export-under-a-file", [*MINIBERT, "export", "{run}", "{tmp}/good.jsonl/export"], {}, {},
     "good.jsonl is a file, not a folder; pass a new or empty folder to export to"),
    ("train-out-under-a-file", [*TRAIN, "--model", "{tmp}/model", "--data", DATA, "--out", "{tmp}/good.jsonl/run"],
     {}, {}, "good.jsonl is a file, not a folder; pass another --out"),
    ("zero-shot-out-under-a-file", [*EVALUATE, "--zero-shot", "--model", "{tmp}/model", "--data", DATA, "--out",
                                    "{tmp}/good.jsonl/zs"], {}, {}, "good.jsonl is a file, not a folder; pass --out"),
    ("run-model-json", [*EVALUATE, "{run}"], {"run/model.json": '{"format": "minibert-run/1", '}, {},
     "model.json: not valid JSON"),
    ("run-weights", [*EVALUATE, "{run}"], {"run/model.safetensors": b"\x00" * 10}, {},
     "model.safetensors: cannot read"),
    ("run-seed", [*EVALUATE, "{run}", "--seed", "1"], {}, {}, "--seed applies to --zero-shot only"),
    ("run-pooling", [*EVALUATE, "{run}", "--pooling", "mean"], {}, {}, "--pooling applies to --zero-shot only"),
    ("zero-shot-split", [*EVALUATE, "--zero-shot", "--split", "dev"], {}, {}, "--split"),
    ("zero-shot-out-file", [*EVALUATE, "--zero-shot", "--out", "{tmp}/model/vocab.txt"], {}, {}, "--out"),
    ("neither", [*EVALUATE], {}, {}, "give either RUN_DIR or --zero-shot"),
    ("zero-shot-onto-a-run", [*EVALUATE, "--zero-shot", "--out", "{run}"], {}, {},
     "holds a trained run (model.safetensors); pass --out a folder of its own"),
    ("zero-shot-onto-a-record", [*EVALUATE, "--zero-shot", "--out", "{tmp}/done"],
     {"done/results.json": '{"experiment": "baseline"}'}, {}, "holds the record of a trained run (results.json)"),
    ("zero-shot-onto-another-seed", [*EVALUATE, "--zero-shot", "--out", "{tmp}/zs"],
     {"zs/results.json": json.dumps({"experiment": "zeroshot", "model_requested": "auto", "seed": 7,
                                     "hyperparameters": {"pooling": "cls"}, "data": {"format": "massive"}})}, {},
     "holds another zero-shot record (seed 7, not 0)"),
    ("zero-shot-onto-a-damaged-record", [*EVALUATE, "--zero-shot", "--out", "{tmp}/zs"],
     {"zs/results.json": '{"experiment": "zero'}, {}, "results.json: not valid JSON"),
    ("zero-shot-onto-a-record-of-other-types", [*EVALUATE, "--zero-shot", "--model", "{tmp}/model", "--out",
                                                "{tmp}/zs"],
     {"zs/results.json": '{"experiment": "zeroshot", "hyperparameters": [1]}'}, {},
     "results.json: hyperparameters is [1], not an object; the file is damaged; delete it, or pass --out"),
    # ---- the lab's readers of the records ----
    ("report-results-not-an-object", [*REPORT, "{tmp}/runs"], {"runs/a-s0/results.json": "[1]"}, {},
     "a-s0/results.json: holds [1], not a JSON object"),
    ("report-results-field", [*REPORT, "{tmp}/runs"],
     {"runs/a-s0/results.json": RECORD.replace('"seed": 0', '"seed": "0"')}, {}, "a-s0/results.json: seed is '0'"),
    ("report-results-untested", [*REPORT, "{tmp}/runs"],
     {"runs/a-s0/results.json": json.dumps({**json.loads(RECORD), "test": None})}, {},
     "a-s0/results.json: no test figures (the run was trained with --no-test)"),
    ("report-readme-missing", [*REPORT, "{tmp}/runs", "--readme", "{tmp}/nowhere.md"],
     {"runs/a-s0/results.json": RECORD}, {}, "nowhere.md: cannot read (No such file or directory)"),
    ("tune-results-field", [*TUNE, "{tmp}/search", "--model", "{tmp}/model", "--candidates", "base"],
     {"search/base-s0/results.json": '{"test": null, "dev": {"accuracy": "0.9"}}'}, {},
     "base-s0/results.json: dev.accuracy is '0.9', not a number"),
    ("curves-row-not-an-object", [*CURVES, "a={tmp}/a-s*"], {"a-s0/metrics.jsonl": "[1]\n"}, {},
     "a-s0/metrics.jsonl:1: expected a JSON object"),
    ("curves-row-field", [*CURVES, "a={tmp}/a-s*"], {"a-s0/metrics.jsonl": '{"dev_accuracy": "0.5"}\n'}, {},
     "a-s0/metrics.jsonl:1: dev_accuracy is '0.5', not a number"),
]


def write_run(folder, labels, label_kind):
    """A run folder as train.py leaves it, of an untrained classifier on the tiny model."""
    encoder, tokenizer, _ = load_pretrained(str(TINY))
    model = ScenarioClassifier(encoder, len(labels))
    folder.mkdir(parents=True)
    save_model(folder, model, tokenizer, labels, TrainConfig(labels=label_kind, max_len=16))
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs") / "run", ("alarm", "audio"), "scenario")


@pytest.mark.parametrize("argv, files, env, message", [pytest.param(*case, id=name) for name, *case in CASES])
def test_bad_input_is_one_line(argv, files, env, message, tmp_path, request):
    shutil.copytree(TINY, tmp_path / "model")
    (tmp_path / "good.jsonl").write_text(jsonl())
    places = {"tmp": tmp_path}
    if any("{run}" in a for a in argv):
        places["run"] = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("finished_run"), places["run"])
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        getattr(tmp_path / path, "write_bytes" if isinstance(content, bytes) else "write_text")(content)
    environment = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    environment.update(OMP_NUM_THREADS="1", **{k: v.format(**places) for k, v in env.items()})
    done = subprocess.run([a.format(**places) for a in argv], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert message in lines[0], lines[0]


def test_every_preset_passes_and_lora_names_are_stripped():
    for preset in PRESETS.values():
        preset.check()
    spaced = PRESETS["lora20"].override(lora_targets="query, value")
    spaced.check()
    assert spaced.lora_target_list == ["query", "value"]


def test_embeddings_of_a_run_trained_on_intents(small_massive, tmp_path):
    """The analysis groups sentences by scenario whatever labels the run trained on."""
    intents = sorted({json.loads(line)["intent"] for line in small_massive.read_text().splitlines()})
    run = write_run(tmp_path / "intent", intents, "intent")
    evaluate.main([str(run), "--embeddings", "--data", str(small_massive)])
    assert 0 <= read_json(run / "embeddings.json")["knn_accuracy"] <= 1


# ---- every number a command takes, out of its range: refused in one line before anything loads ----

def run_to_exit(main, argv, capsys):
    """Run `main(argv)` in this process until it exits → (exit status, its line: the one line of
    an error, or the last line printed on exit 0). AssertionError if it runs to its end, raises
    (the user would see a traceback) or explains an error in more than one line."""
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # AssertionError too: something loaded
        raise AssertionError(f"{argv}: {e!r}, not one line") from e
    else:
        raise AssertionError(f"{argv}: accepted")
    printed = capsys.readouterr()
    if code in (0, None):
        return 0, printed.out.strip().splitlines()[-1]
    # sys.exit("...") prints its message and exits 1; a usage error prints, then exits 2.
    lines = code.splitlines() if isinstance(code, str) else printed.err.strip().splitlines()
    assert len(lines) == 1, lines
    return (1 if isinstance(code, str) else code), lines[0]


def one_line_exit(main, argv, capsys):
    """→ the one line `main(argv)` exits with; AssertionError unless it is refused with one line."""
    status, line = run_to_exit(main, argv, capsys)
    assert status != 0, f"{argv}: exit status 0"
    return line


@pytest.fixture
def nothing_loads(monkeypatch):
    """Data, weights, a run and the lab's runs all fail the test if anything reaches them."""
    def loads(*args, **kwargs):
        raise AssertionError("got as far as loading data, weights or a run")

    for module, names in [(train, ["load_data"]), (training, ["read_config", "load_pretrained"]),
                          (evaluate, ["load_data", "run_data", "load_pretrained", "load_model"]),
                          (paper, ["resolve", "run_all"]), (tune, ["resolve", "run_all"])]:
        for name in names:
            monkeypatch.setattr(module, name, loads)


# Values out of range of every numeric flag of train.py. NaN and inf too: a float flag checked
# with "x > 0" alone would take inf, and one checked with "not x < 0" would take NaN.
BAD_NUMBERS = {
    "--epochs": ["0", "-1", "nan"],
    "--lr": ["0", "-1e-4", "nan", "inf"],
    "--batch-size": ["0", "-16"],
    "--drop-rate": ["-0.1", "1", "nan"],
    "--hidden-dim": ["0", "-10"],
    "--max-len": ["2", "-1"],
    "--adam-eps": ["0", "-1e-8", "nan", "inf"],
    "--weight-decay": ["-0.01", "nan", "inf"],
    "--seed": ["-1", str(MAX_SEED + 1), "1.5"],
    "--max-grad-norm": ["-1", "nan", "inf"],
    "--warmup-steps": ["-1"],
    "--warmup-ratio": ["-0.1", "1", "nan"],
    "--swa-start": ["-0.1", "1", "nan"],
    "--swa-lr": ["-1e-5", "nan", "inf"],
    "--swa-anneal-epochs": ["0", "-1"],
    "--lora-r": ["-1"],
    "--lora-alpha": ["0", "-8", "nan", "inf"],
    "--lora-dropout": ["-0.1", "1", "nan"],
    "--temperature": ["0", "-0.07", "nan", "inf"],
    "--contrastive-drop-rate": ["-0.5", "1", "nan"],
    "--contrastive-epochs": ["-2"],
    "--layer-decay": ["0", "-0.5", "1.5", "nan"],
    "--rdrop": ["-1", "nan", "inf"],
    "--log-every": ["0", "-1"],
}
# Counts far past any run, a slip of the keyboard: refused by their bound, not a run that never
# ends or a tensor that never fits. (The seed's bound is in BAD_NUMBERS.)
HUGE = str(10**20)
COUNTS = [flag(name) for name in FLAGS if type(FIELDS[name].default) is int and name != "seed"] + ["--log-every"]
# Numbers in range that cannot work together, or would be ignored: (flags, what the line says).
BAD_COMBINATIONS = [
    (["--contrastive-epochs", "-1"], "--contrastive-epochs -1 with --loss ce"),  # -1: as many as --epochs
    (["--experiment", "supcon", "--loss", "ce"], "--contrastive-epochs -1 with --loss ce"),
    (["--warmup-steps", "10"], "--warmup-steps 10 with --scheduler constant"),
    (["--experiment", "best", "--scheduler", "constant"], "--warmup-ratio 0.06 with --scheduler constant"),
    (["--layer-decay", "0.8", "--stage2", "probe"], "--layer-decay 0.8 with --stage2 probe"),
    (["--experiment", "supcon", "--simclr-negatives", "other-labels"], "--simclr-negatives other-labels with --loss "
                                                                       "supcon"),
    (["--lora-alpha", "16"], "--lora-alpha 16.0: LoRA's setting, and this run has none; pass --lora-r N"),
    (["--lora-targets", "query"], "--lora-targets query: LoRA's setting"),
    (["--swa-lr", "0.001"], "--swa-lr 0.001: SWA's setting, and this run has none; pass --swa"),
    (["--swa-anneal", "linear"], "--swa-anneal linear: SWA's setting"),
    (["--temperature", "0.5"], "--temperature 0.5: the contrastive loss's setting"),
    (["--experiment", "lora20", "--stage2", "probe"], "--lora-r 20 with --stage2 probe: the probe freezes"),
    (["--experiment", "lora20-tuned", "--lora-r", "0"], "--lora-alpha 40.0 (from --experiment lora20-tuned): LoRA's"),
]
# The lab's commands and evaluate.py: (main, argv, what the line says).
BAD_LAB_NUMBERS = [
    (evaluate.main, ["--zero-shot", "--seed", "-1"], "--seed -1: must be a whole number from 0"),
    (evaluate.main, ["--zero-shot", "--seed", str(MAX_SEED + 1)], f"--seed {MAX_SEED + 1}"),
    (evaluate.main, ["--zero-shot", "--seed", "nan"], "--seed"),
    (paper.main, ["{tmp}", "--epochs", "0"], "--epochs"),
    (paper.main, ["{tmp}", "--seeds", "0"], "--seeds"),
    (paper.main, ["{tmp}", "--jobs", "-1"], "--jobs"),
    (tune.main, ["{tmp}", "--epochs", "0"], "--epochs"),
    (tune.main, ["{tmp}", "--jobs", "0"], "--jobs"),
    (tune.main, ["{tmp}", "--seed", "-1"], "--seed -1: must be a whole number from 0"),
    (tune.main, ["{tmp}", "--seed", str(MAX_SEED + 1)], f"--seed {MAX_SEED + 1}"),
    (paper.main, ["{tmp}", "--seeds", HUGE], "--seeds must be from 1 to 1000"),
    (paper.main, ["{tmp}", "--jobs", HUGE], "--jobs and --seeds must be from 1 to 1000"),
    (paper.main, ["{tmp}", "--epochs", HUGE], "--epochs from 1 to 10000"),
    (tune.main, ["{tmp}", "--jobs", HUGE], "--jobs must be from 1 to 1000"),
    (tune.main, ["{tmp}", "--epochs", HUGE], "--epochs from 1 to 10000"),
]


def refused_number(argv, folder, capsys):
    """train.py with `argv` → its one line, from a check that ran before anything loaded."""
    return one_line_exit(train.main, ["--model", "tiny", "--out", str(folder / "run"), *argv], capsys)


def test_every_numeric_flag_has_bad_values():
    numeric = {flag(name) for name in FLAGS if type(FIELDS[name].default) in (int, float)}
    assert numeric | {"--log-every"} == set(BAD_NUMBERS)


@pytest.mark.parametrize("name, value", [pytest.param(name, value, id=f"{name} {value}")
                                         for name, values in BAD_NUMBERS.items() for value in values])
def test_a_number_out_of_range_is_refused_before_anything_loads(name, value, nothing_loads, tmp_path, capsys):
    line = refused_number([f"{name}={value}"], tmp_path, capsys)  # = : "-1" would read as a flag of its own
    assert line.startswith("train.py:") and name in line, line


@pytest.mark.parametrize("name", COUNTS)
def test_a_huge_count_is_refused_before_anything_loads(name, nothing_loads, tmp_path, capsys):
    line = refused_number([f"{name}={HUGE}"], tmp_path, capsys)
    assert f"{name} {HUGE}: must be" in line and "and at most" in line, line


@pytest.mark.parametrize("argv, message", [pytest.param(*case, id=" ".join(case[0])) for case in BAD_COMBINATIONS])
def test_numbers_that_cannot_work_together_are_refused(argv, message, nothing_loads, tmp_path, capsys):
    assert message in refused_number(argv, tmp_path, capsys)


@pytest.mark.parametrize("main, argv, message", [pytest.param(*case, id=" ".join([case[0].__module__, *case[1][1:]]))
                                                 for case in BAD_LAB_NUMBERS])
def test_the_lab_and_evaluate_refuse_numbers_out_of_range(main, argv, message, nothing_loads, tmp_path, capsys):
    assert message in one_line_exit(main, [a.format(tmp=tmp_path) for a in argv], capsys)


# ---- a finished run asked to resume: done if it is the same run, refused if not ----------------

def resume_finished(hyperparameters, argv, folder, capsys, **fields):
    """train.py --resume on a finished run whose results.json records `hyperparameters` (and
    `fields`) → (exit status, its line)."""
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"hyperparameters": hyperparameters, **fields}))
    return run_to_exit(train.main, ["--model", "tiny", "--epochs", "1", "--out", str(folder), "--resume", *argv],
                       capsys)


FINISHED = PRESETS["baseline"].override(model="tiny", epochs=1).to_dict()


def test_a_finished_run_resumed_with_its_settings_is_done(nothing_loads, tmp_path, capsys):
    assert resume_finished(FINISHED, [], tmp_path / "run", capsys) == (
        0, f"{tmp_path / 'run'} is already complete: see its results.json (delete the folder to train again)")
    # A record older than some settings ran them at their defaults: it is the same run.
    older = {k: v for k, v in FINISHED.items() if k not in ("pooling", "rdrop")}
    assert resume_finished(older, [], tmp_path / "older", capsys)[0] == 0


@pytest.mark.parametrize("argv, differ", [
    (["--lr", "1e-3"], "(lr: 0.0001 → 0.001)"),
    (["--seed", "1", "--bucket"], "(seed: 0 → 1, bucket: False → True)"),
    (["--experiment", "scheduler"], "(experiment: 'baseline' → 'scheduler', scheduler: 'constant' → 'linear')"),
], ids=["lr", "seed-and-bucket", "experiment"])
def test_a_finished_run_resumed_with_other_settings_is_refused(argv, differ, nothing_loads, tmp_path, capsys):
    status, line = resume_finished(FINISHED, argv, tmp_path / "run", capsys)
    assert status != 0 and line == (f"train.py: cannot resume {tmp_path / 'run'} with other hyperparameters {differ}; "
                                    "resume it with the settings it was trained with, or pass another --out")


def test_a_finished_run_without_hyperparameters_is_refused(nothing_loads, tmp_path, capsys):
    status, line = resume_finished(None, [], tmp_path / "run", capsys)
    assert status != 0 and "results.json: no hyperparameters" in line


def test_a_finished_run_whose_record_is_damaged_is_refused(nothing_loads, tmp_path, capsys):
    status, line = resume_finished(FINISHED, [], tmp_path / "run", capsys, data="massive")
    assert status != 0 and line.endswith("results.json: data is 'massive', not an object; the file is damaged: "
                                         "restore it, or train the run again"), line


def test_a_finished_run_is_not_resumed_on_edited_sentences(nothing_loads, tmp_path, capsys):
    """The same file name and flags, other sentences: refused by the digest of the split, as an
    unfinished run is; on the sentences it trained on, it is done."""
    own = tmp_path / "own.csv"
    rows = [("wake me up at seven", "alarm"), ("is it raining", "weather"), ("set an alarm", "alarm"),
            ("sunny tomorrow", "weather")] * 5
    own.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    source = Source(str(own))
    trained_on = describe(source, load_data(source))
    own.write_text("text,label\n" + "".join(f"{text} please,{label}\n" for text, label in rows))
    status, line = resume_finished(FINISHED, ["--data", str(own)], tmp_path / "run", capsys, data=trained_on)
    assert status != 0 and f"cannot resume {tmp_path / 'run'}: {own} no longer holds the sentences it started on" \
        in line, line
    own.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    status, line = run_to_exit(train.main, ["--model", "tiny", "--epochs", "1", "--out", str(tmp_path / "run"),
                                            "--resume", "--data", str(own)], capsys)
    assert (status, line) == (0, f"{tmp_path / 'run'} is already complete: see its results.json (delete the folder "
                                 "to train again)")


# ---- --predict: an empty sentence is refused, not taken for none --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--predict", ""], "--predict '': an empty sentence; give the text to classify"),
    (["--predict", "  \t "], "--predict '  \\t ': an empty sentence"),
    (["--predict-file", ""], "--predict-file '': no file named"),
], ids=["empty", "blank", "no-file-named"])
def test_an_empty_sentence_is_refused(argv, message, nothing_loads, tmp_path, capsys):
    assert message in one_line_exit(evaluate.main, [str(tmp_path), *argv], capsys)


def test_predict_file_skips_blank_lines_and_refuses_a_blank_file(finished_run, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    assert "blank.txt: no sentences; give one per line" in one_line_exit(
        evaluate.main, [str(finished_run), "--predict-file", str(tmp_path / "blank.txt")], capsys)
    (tmp_path / "one.txt").write_text("\n  wake me up at seven \r\n\n")
    evaluate.main([str(finished_run), "--predict-file", str(tmp_path / "one.txt")])
    label, probability, sentence = capsys.readouterr().out.strip().split("\t")
    assert label in ("alarm", "audio") and 0 < float(probability) <= 1 and sentence == "wake me up at seven"
    # A line separator or a form feed inside a sentence does not cut it in two.
    (tmp_path / "two.txt").write_text("wake me up\u2028at seven\nplay\x0cjazz\n", encoding="utf-8")
    evaluate.main([str(finished_run), "--predict-file", str(tmp_path / "two.txt")])
    assert [row.split("\t")[2] for row in capsys.readouterr().out.strip().split("\n")] == [
        "wake me up\u2028at seven", "play\x0cjazz"]


def test_predict_file_reads_past_a_byte_order_mark(finished_run, tmp_path, capsys):
    (tmp_path / "marked.txt").write_text("\ufeffwake me up at seven\n", encoding="utf-8")
    evaluate.main([str(finished_run), "--predict-file", str(tmp_path / "marked.txt")])
    assert capsys.readouterr().out.strip().split("\t")[2] == "wake me up at seven"


def test_predict_from_python_refuses_what_the_command_line_refuses(finished_run):
    """minibert.load_run(...).predict: a blank sentence or one that is not text is refused by its
    place in the list, never classified or passed on to the tokenizer."""
    clf = minibert.load_run(finished_run, device="cpu")
    with pytest.raises(ValueError, match=r"^sentence 1 is ' \\t': blank; give the text to classify, or leave it out$"):
        clf.predict(["wake me up", " \t"])
    with pytest.raises(TypeError, match="^sentence 2 is NoneType None, not a string; pass the text of each sentence$"):
        clf.predict(["wake me up", "play jazz", None])
    with pytest.raises(TypeError, match="^predict takes a list of sentences, not int; wrap one sentence in a list$"):
        clf.predict(7)
    with pytest.raises(ValueError, match="^batch_size 0: must be a whole number of at least 1$"):
        clf.predict(["wake me up"], batch_size=0)
    labels, probabilities = clf.predict(sentence for sentence in ["wake me up", "play jazz"])  # any iterable
    assert len(labels) == 2 and probabilities.shape == (2, 2)


def test_a_run_on_data_of_your_own_is_not_said_to_be_of_massive(tmp_path, capsys):
    """Without its results.json, a run on data of your own is known by its label column all the same."""
    run = write_run(tmp_path / "run", ("rain", "sun"), "topic")
    own = tmp_path / "own.csv"
    own.write_text("text,label\n" + "wake me up,alarm\nis it raining,weather\nplay jazz,music\n" * 10)
    line = one_line_exit(evaluate.main, [str(run), "--data", str(own)], capsys)
    assert "the run's 2 labels do not match the data's 3 topic labels; it was trained on data of your own" in line


def test_a_warmup_longer_than_the_run_is_refused(tiny_model, small_massive, tmp_path):
    """96 sentences in batches of 16 for 3 epochs: 18 steps. Known once the data is read, and
    refused before the run folder is made."""
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--out", str(out), "--max-len", "16",
              "--epochs", "3"]
    for flags, warmup in ((["--scheduler", "linear", "--warmup-steps", "19"], 19),
                          (["--scheduler", "cosine", "--warmup-steps", "100"], 100)):
        expected = (rf"^train.py: --warmup-steps {warmup}: more than the run's 18 optimizer steps \(3 epochs of 6\), "
                    r"so the rate would never decay; pass at most 18$")
        with pytest.raises(SystemExit, match=expected):
            train.main([*common, *flags])
        assert not out.exists()
