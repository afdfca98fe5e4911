"""No command destroys what it did not make. Each writes into a new or empty folder, or into one
that proves to be its own (a run's, a zero-shot record's, a report's); anything else is refused
before the first write, in one line that names it, and is left byte for byte as it was.

The refusals run the real command in a process of its own, as a person runs it; each test also
shows the command still taking back what is its own."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import train
from lab import agreement, report, stage1
from minibert.classifier import ScenarioClassifier
from minibert.data import SCENARIOS
from minibert.experiments import TrainConfig
from minibert.export import export_run
from minibert.runs import read_json, save_model
from minibert.weights import load_pretrained
from tests.cases import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
TINY = REFERENCE / "tiny_odd"  # max_position_embeddings 16: runs on it pass --max-len 16
RECORD = ROOT / "results/best/all-MiniLM-L6-v2-e10/best-s0/results.json"  # a finished run's committed record


def snapshot(folder):
    """Every file below `folder`, by its path there, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def refused(argv, where):
    """Run `python ARGV` → its one line: a non-zero exit, one line on stderr and no traceback, which
    names `where` as something the command did not write."""
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert f"{where} " in lines[0] and "did not write" in lines[0], lines[0]
    return lines[0]


def write_run(folder):
    """A run folder as train.py leaves its model: an untrained classifier on the tiny BERT."""
    encoder, tokenizer, _ = load_pretrained(str(TINY))
    folder.mkdir(parents=True)
    save_model(folder, ScenarioClassifier(encoder, len(SCENARIOS)), tokenizer, SCENARIOS, TrainConfig(max_len=16))
    return folder


def on_tiny(data, out, *extra):
    return ["--model", str(TINY), "--max-len", "16", "--epochs", "1", "--data", str(data), "--out", str(out), *extra]


# ---- train.py -------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, extra", [("weights", []), ("weights", ["--resume"]), ("export", [])],
                         ids=["weights", "weights-resume", "export"])
def test_train_writes_into_no_model_folder(folder, extra, small_massive, tmp_path):
    """A pretrained model's folder (its model.safetensors would be replaced, and the model would
    no longer load) and an exported run's folder are no run's: --out on them is refused, also
    with --resume, as every make target trains."""
    target = tmp_path / "target"
    if folder == "weights":
        shutil.copytree(TINY, target)
    else:
        export_run(write_run(tmp_path / "run"), target)
    before = snapshot(target)
    line = refused(["train.py", *on_tiny(small_massive, target, *extra)], target)
    assert "pass another --out" in line
    assert snapshot(target) == before


def test_train_refuses_a_file_of_its_own_and_starts_again_where_a_run_began(small_massive, tmp_path):
    """A folder holding a file no run writes is refused. One that holds no more than a run's
    beginning (train.log, where lab.paper or a shell sends its output) is the run's: it trains
    there, the log kept, and the finished run asked again says it is complete."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["train.py", *on_tiny(small_massive, out)], out)
    assert snapshot(out) == {"notes.txt": b"mine"}
    (out / "notes.txt").unlink()
    (out / "train.log").write_text("start run: python train.py\n")
    assert train.main(on_tiny(small_massive, out, "--resume", "--log-every", "100")) == out
    assert (out / "train.log").read_text() == "start run: python train.py\n"
    assert read_json(out / "results.json")["experiment"] == "baseline"
    with pytest.raises(SystemExit) as done:
        train.main(on_tiny(small_massive, out, "--resume"))
    assert done.value.code == 0


# ---- evaluate.py ----------------------------------------------------------------------------------

def test_zero_shot_refuses_a_file_of_its_own_and_rewrites_its_own_record(small_massive, minilm_dir, tmp_path):
    """The zero-shot record goes to --out only where nothing but its own is: a folder with another
    file is refused; lab.paper's train.log is its own, and so is its record, rewritten on a re-run."""
    out = tmp_path / "zeroshot-s0"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--zero-shot", "--model", "all-MiniLM-L6-v2", "--data", str(small_massive), "--out", str(out)]
    assert "pass --out a folder of its own" in refused(["evaluate.py", *argv], out)
    assert snapshot(out) == {"notes.txt": b"mine"}
    (out / "notes.txt").unlink()
    (out / "train.log").write_text("start zeroshot-s0\n")
    evaluate.main(argv)
    first = read_json(out / "results.json")
    evaluate.main(argv)
    assert read_json(out / "results.json")["test"] == first["test"]
    assert (out / "train.log").read_text() == "start zeroshot-s0\n"


# ---- python -m minibert: export, weights --compact -------------------------------------------------

def test_export_refuses_a_folder_it_did_not_make(tmp_path):
    run = write_run(tmp_path / "run")
    target = shutil.copytree(TINY, tmp_path / "model")
    before = snapshot(target)
    assert "pass a new or empty folder" in refused(["-m", "minibert", "export", run, target], target)
    assert snapshot(target) == before


def test_compact_copies_beside_a_folder_without_touching_it(tmp_path):
    """The fp16 copy is written whole beside DIR before it is renamed onto it: into a folder of
    its own, never into (or over) a DIR.part that is someone else's. DIR itself must be new or empty."""
    part = tmp_path / "fp16.part"
    part.mkdir()
    (part / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "minibert", "weights", str(TINY), "--compact", str(tmp_path / "fp16")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert snapshot(part) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16", "fp16.part"]  # no temporary folder left
    model = shutil.copytree(TINY, tmp_path / "model")
    before = snapshot(model)
    refused(["-m", "minibert", "weights", TINY, "--compact", model], model)
    assert snapshot(model) == before


# ---- the lab ---------------------------------------------------------------------------------------

def test_agreement_rewrites_its_own_figures_and_no_other_file(small_massive, tmp_path):
    runs = [write_run(tmp_path / f"s{seed}") for seed in (0, 1)]
    argv = [*map(str, runs), "--data", str(small_massive), "--split", "dev"]
    out = tmp_path / "agreement-dev.json"
    agreement.main([*argv, "--out", str(out)])
    agreement.main([*argv, "--out", str(out)])  # its own figures: rewritten
    assert read_json(out)["runs"] == 2
    foreign = tmp_path / "s0" / "model.json"
    before = foreign.read_bytes()
    refused(["-m", "lab.agreement", *argv, "--out", foreign], foreign)
    assert foreign.read_bytes() == before


def test_stage1_rewrites_its_own_figures_and_no_other_file(small_massive, tmp_path):
    out = tmp_path / "run"
    run = train.setup(train.parse_args([*on_tiny(small_massive, out), "--loss", "simclr", "--contrastive-epochs", "1"]))
    train.train_epoch(run, 0)  # stage 1, and its checkpoint
    argv = [str(run.checkpoint), "--model", str(TINY), "--data", str(small_massive)]
    stage1.main([*argv, "--out", str(out / "stage1.json")])
    stage1.main([*argv, "--out", str(out / "stage1.json")])  # its own figures: rewritten
    foreign = run.checkpoint  # the very file it reads
    before = foreign.read_bytes()
    refused(["-m", "lab.stage1", *argv, "--out", foreign], foreign)
    assert foreign.read_bytes() == before


def test_report_rewrites_its_own_pages_and_no_other(tmp_path):
    folder = tmp_path / "best"
    (folder / "best-s0").mkdir(parents=True)
    shutil.copyfile(RECORD, folder / "best-s0" / "results.json")
    report.main([str(folder)])
    report.main([str(folder)])  # its own report.md, report.json and figure: rewritten
    assert (folder / "report.md").read_text().startswith(report.TITLE)
    (folder / "report.md").write_text("# my notes on these runs\n")
    before = snapshot(folder)
    refused(["-m", "lab.report", folder], folder / "report.md")
    assert snapshot(folder) == before


@pytest.mark.parametrize("runner, argv, files, where", [
    ("lab.paper", ["--rows", "zeroshot", "--seeds", "1"], {"zeroshot-s0/notes.txt": "mine"}, "zeroshot-s0"),
    ("lab.tune", ["--candidates", "base", "--epochs", "1"], {"base-s0/notes.txt": "mine"}, "base-s0"),
    # The report, written after the last run, is checked before the first.
    ("lab.paper", ["--rows", "zeroshot", "--seeds", "1"], {"report.md": "# my notes\n"}, "report.md"),
    ("lab.tune", ["--candidates", "base", "--epochs", "1"], {"dev.md": "# my notes\n"}, "dev.md"),
], ids=["paper-run", "tune-run", "paper-report", "tune-table"])
def test_the_lab_starts_nothing_where_it_would_write_over_what_it_did_not_make(runner, argv, files, where, tmp_path):
    """lab.paper and lab.tune check every run folder they will fill, and every page they will write,
    before the first run starts: a run folder holding a file no run wrote, or a page of that name
    they did not write, is refused with nothing started or written."""
    folder = tmp_path / "results"
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    before = snapshot(folder)
    refused(["-m", runner, folder, "--model", TINY, *argv], folder / where)
    assert snapshot(folder) == before
