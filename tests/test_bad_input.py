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
import train
from minibert.classifier import ScenarioClassifier
from minibert.experiments import PRESETS, TrainConfig
from minibert.runs import read_json
from minibert.weights import load_pretrained
from tests import cases

ROOT = Path(__file__).resolve().parents[1]
TINY = cases.REFERENCE / "tiny_odd"  # max_position_embeddings 16
NO_MODEL = ["--model", "/nonexistent/model"]
LINE = {"id": "0", "locale": "en-US", "partition": "train", "scenario": "alarm", "intent": "alarm_set",
        "utt": "wake me up at five am"}


def jsonl(*replaced):
    """A three-line MASSIVE file (train, dev, test) with line 2 replaced, if given."""
    lines = [json.dumps({**LINE, "partition": p}) for p in ("train", "dev", "test")]
    if replaced:
        lines[1] = replaced[0]
    return "\n".join(lines) + "\n"


TRAIN = [sys.executable, "train.py"]
EVALUATE = [sys.executable, "evaluate.py"]
MINIBERT = [sys.executable, "-m", "minibert"]
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
    ("vocab-not-utf8", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/vocab.txt": b"[PAD]\n\xff\xfe\n"}, {}, "vocab.txt: cannot read"),
    ("tokenizer-json-corrupt", [*TRAIN, *ON_TINY, "--max-len", "16", "--data", DATA],
     {"model/tokenizer.json": '{"version": "1.0", "trunc'}, {}, "tokenizer.json: not a readable"),
    ("compact-onto-a-file", [*MINIBERT, "weights", "{tmp}/model", "--compact", "{tmp}/model/vocab.txt"], {}, {},
     "--compact"),
    ("minibert-usage", [*MINIBERT], {}, {}, "command"),
    # ---- evaluate.py: what RUN_DIR is, and flags that do not go with it ----
    ("run-is-a-file", [*EVALUATE, "{tmp}/model/config.json"], {}, {}, "config.json: a file"),
    ("run-not-a-run", [*EVALUATE, "{tmp}/model"], {}, {}, "model.json: missing"),
    ("weight-changes-split", [*EVALUATE, "{run}", "--weight-changes", "--split", "dev"], {}, {}, "--split applies"),
    ("weight-changes-zero-shot", [*EVALUATE, "--zero-shot", "--weight-changes"], {}, {},
     "--weight-changes needs a trained RUN_DIR"),
    ("run-unfinished", [*EVALUATE, "{tmp}/half"], {"half/checkpoint.safetensors": b""}, {}, "has not finished"),
    ("run-model-json", [*EVALUATE, "{run}"], {"run/model.json": '{"format": "minibert-run/1", '}, {},
     "model.json: not valid JSON"),
    ("run-weights", [*EVALUATE, "{run}"], {"run/model.safetensors": b"\x00" * 10}, {},
     "model.safetensors: cannot read"),
    ("run-seed", [*EVALUATE, "{run}", "--seed", "1"], {}, {}, "--seed applies to --zero-shot only"),
    ("run-pooling", [*EVALUATE, "{run}", "--pooling", "mean"], {}, {}, "--pooling applies to --zero-shot only"),
    ("zero-shot-split", [*EVALUATE, "--zero-shot", "--split", "dev"], {}, {}, "--split"),
    ("zero-shot-out-file", [*EVALUATE, "--zero-shot", "--out", "{tmp}/model/vocab.txt"], {}, {}, "--out"),
    ("neither", [*EVALUATE], {}, {}, "give either RUN_DIR or --zero-shot"),
]


def write_run(folder, labels, label_kind):
    """A run folder as train.py leaves it, of an untrained classifier on the tiny model."""
    encoder, tokenizer, _ = load_pretrained(str(TINY))
    model = ScenarioClassifier(encoder, len(labels))
    folder.mkdir(parents=True)
    train.save_model(folder, model, tokenizer, labels, TrainConfig(labels=label_kind, max_len=16))
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
