"""A full disk costs a run no more than the epoch it is in, and says so in one line.

Every file of a run folder is written to a temporary name and renamed into place (minibert/runs.py).
When the disk fills up, the write fails with the operating system's error, in one of two forms, as
seen on a real full tmpfs: Python raises OSError(ENOSPC, 'No space left on device') and leaves the
bytes that fitted; safetensors raises its own SafetensorError("Error while serializing: I/O error:
No space left on device (os error 28)"). The tests plant those very errors half-way through a
write, which needs no privilege; where the machine lets a test mount a small tmpfs (root), the
disk really fills up too.
"""

import errno
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import train
from minibert import runs
from minibert.runs import WriteError, checkpoint_state, load_tensors, save_tensors, write_csv, write_json, write_jsonl
from tests.cases import REFERENCE

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def disk_fills_up(monkeypatch, name, after=0):
    """From the (after + 1)-th write of the file `name` on, the disk fills up half-way through it:
    half of the bytes land in the temporary file, then the writer raises what it raises on a real
    full disk. → {"before": the file's bytes when its last write began, None if it had none}."""
    seen = {"writes": 0, "before": None}

    def fills_up(tmp):
        if Path(tmp).name not in (name + ".tmp", name):  # the file itself too, were it written in place
            return False
        seen["writes"] += 1
        target = Path(tmp).with_name(name)
        seen["before"] = target.read_bytes() if target.exists() else None
        return seen["writes"] > after

    def enospc():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_text, save_file, csv_writer = Path.write_text, runs.save_file, runs.csv.writer

    def full_write_text(path, text, *args, **kwargs):
        if not fills_up(path):
            return write_text(path, text, *args, **kwargs)
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise enospc()

    def full_save_file(tensors, path, metadata=None):
        fails = fills_up(path)
        save_file(tensors, path, metadata=metadata)
        if fails:
            os.truncate(path, os.path.getsize(path) // 2)
            raise SafetensorError(SAFETENSORS_FULL)

    class FullCsvWriter:
        def __init__(self, f):
            self.f, self.writer = f, csv_writer(f)

        def writerows(self, rows):
            rows = list(rows)
            self.writer.writerows(rows[: len(rows) // 2])
            self.f.flush()
            raise enospc()

    monkeypatch.setattr(Path, "write_text", full_write_text)
    monkeypatch.setattr(runs, "save_file", full_save_file)
    monkeypatch.setattr(runs.csv, "writer", lambda f: FullCsvWriter(f) if fills_up(f.name) else csv_writer(f))
    return seen


# A file of each kind a run folder holds, and a call that writes it.
WRITERS = {
    "results.json": lambda path: write_json(path, {"test": {"accuracy": 0.9}, "seed": 0}),
    "metrics.jsonl": lambda path: write_jsonl(path, [{"epoch": 1, "train_loss": 2.5}, {"epoch": 2}]),
    "predictions-test.csv": lambda path: write_csv(path, [["id", "utterance"], ["0", "wake me up"], ["1", "play"]]),
    "checkpoint.safetensors": lambda path: save_tensors(path, {"w": torch.arange(1000.0)}, {"state": "{}"}),
}
NEVER = math.inf  # disk_fills_up(..., after=NEVER): no planted failure, only what the file held


def write_fault(name, previous, folder, fill):
    """Write `name` into `folder` (over a previous version if `previous`) while `fill()` fills the
    disk → what went wrong, [] if nothing: the error must be a WriteError naming the file, with its
    one line; the previous version must be intact, and no temporary file left."""
    path = folder / name
    before = None
    if previous:
        WRITERS[name](path)
        before = path.read_bytes()
    fill()
    problems = []
    try:
        WRITERS[name](path)
        problems.append("the write succeeded")
    except WriteError as e:
        kept = f"the previous {name} is kept" if previous else "nothing was written"
        expected = f"cannot write {path} (No space left on device); {kept}: free space and run the command again"
        if str(e) != expected:
            problems.append(f"said {str(e)!r}, not {expected!r}")
    except Exception as e:  # a traceback for the user
        problems.append(f"raised {e!r}, not a WriteError")
    if (path.read_bytes() if path.exists() else None) != before:
        problems.append(f"{name}: not the previous version")
    if path.with_name(name + ".tmp").exists():
        problems.append(f"left {name}.tmp behind")
    return problems


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-previous-version", "first-write"])
@pytest.mark.parametrize("name", WRITERS)
def test_a_failed_write_names_the_file_and_keeps_the_previous_version(name, previous, tmp_path, monkeypatch):
    assert write_fault(name, previous, tmp_path, lambda: disk_fills_up(monkeypatch, name)) == []


def other_failure_lines(folder):
    """→ the lines of a write refused for want of permission, and of one over a disk quota as
    safetensors words it: only a full disk asks for space."""
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES))
    quota = SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    return [str(runs.write_error(folder / "results.json", denied)),
            str(runs.write_error(folder / "model.safetensors", quota))]


def test_other_write_failures_say_what_the_system_said(tmp_path):
    assert other_failure_lines(tmp_path) == [
        f"cannot write {tmp_path / 'results.json'} (Permission denied); nothing was written: once it can be "
        "written, run the command again",
        f"cannot write {tmp_path / 'model.safetensors'} (Disk quota exceeded); nothing was written: free space and "
        "run the command again"]


def mount_small_disk(folder, size):
    """Mount a tmpfs of `size` bytes at `folder` → whether it worked (it needs root); remounted
    with another size, it frees or takes away space."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    options = f"size={size}" + (",remount" if os.path.ismount(folder) else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (skipped where it cannot be mounted)."""
    disk = tmp_path / "disk"
    if not mount_small_disk(disk, 256 * 1024):
        pytest.skip("cannot mount a tmpfs here (needs root): the planted full disk above stands in for it")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-previous-version", "first-write"])
@pytest.mark.parametrize("name", WRITERS)
def test_a_really_full_disk(name, previous, small_disk):
    def fill():  # with every byte the disk has left
        with open(small_disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
        assert e.value.errno == errno.ENOSPC

    assert write_fault(name, previous, small_disk, fill) == []


# ---- a training run on a disk that fills up ----------------------------------------------------

def tiny_args(data, out, *extra):
    """Two epochs of the tiny BERT on the small MASSIVE file: a few seconds."""
    return ["--model", str(REFERENCE / "tiny_odd"), "--max-len", "16", "--data", str(data), "--out", str(out),
            "--epochs", "2", "--log-every", "100", *extra]


def outcome(run_dir):
    """What must be identical between two runs: every metric but the clock."""
    results = json.loads((run_dir / "results.json").read_text())
    history = [{k: v for k, v in row.items() if "second" not in k}
               for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    return results["test"], results["dev"], history


@pytest.fixture(scope="module")
def whole_run(small_massive, tmp_path_factory):
    return outcome(train.main(tiny_args(small_massive, tmp_path_factory.mktemp("whole") / "run")))


# The file whose write fails; after how many good writes of it; the epoch of the checkpoint that
# failure leaves, and of the last row of metrics.jsonl.
FAILURES = {
    "checkpoint.safetensors": (1, 1, 2),  # epoch 2's row is written before epoch 2's checkpoint
    "metrics.jsonl": (1, 1, 1),
    "results.json": (0, 2, 2),  # the checkpoint is deleted only once the record is written
}


def full_disk_run(data, out, name, fill):
    """Train while `fill()` fills the disk at the write of `name` → what went wrong, [] if nothing:
    the run must stop with one line that names the file and says how to go on, and leave the last
    completed epoch's checkpoint intact and loadable, and no temporary file."""
    _, epoch, last_row = FAILURES[name]
    seen = fill()
    problems = []
    try:
        train.main(tiny_args(data, out))
        problems.append("the run finished")
    except SystemExit as e:
        kept = f"the previous {name} is kept" if seen["before"] is not None else "nothing was written"
        expected = (f"train.py: cannot write {out / name} (No space left on device); {kept}: free space and run "
                    "the same command with --resume")
        if e.code != expected:
            problems.append(f"exited with {e.code!r}, not {expected!r}")
    except Exception as e:
        problems.append(f"a traceback: {e!r}")
    checkpoint = out / "checkpoint.safetensors"
    try:
        load_tensors(checkpoint)
        if checkpoint_state(checkpoint)["epoch"] != epoch:
            problems.append(f"the checkpoint is of epoch {checkpoint_state(checkpoint)['epoch']}")
    except ValueError as e:
        problems.append(f"the checkpoint is lost: {e}")
    if name == "checkpoint.safetensors" and seen["before"] != checkpoint.read_bytes():
        problems.append("the checkpoint is not the one the failed write started from")
    if json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] != last_row:
        problems.append("metrics.jsonl is not as the last good write left it")
    problems += [f"left {p.name}" for p in out.glob("*.tmp")]
    return problems


@pytest.mark.parametrize("name", FAILURES)
def test_a_full_disk_stops_in_one_line_and_resume_ends_as_an_uninterrupted_run(name, whole_run, small_massive,
                                                                               tmp_path):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        assert full_disk_run(small_massive, out, name, lambda: disk_fills_up(m, name, FAILURES[name][0])) == []
    assert train.main(tiny_args(small_massive, out, "--resume")) == out  # space again: the same command
    assert outcome(out) == whole_run
    assert not (out / "checkpoint.safetensors").exists()


def test_a_really_full_disk_during_training(whole_run, small_massive, tmp_path):
    """On a real tmpfs that holds one checkpoint but not its replacement beside it: the second
    epoch's checkpoint cannot be written. Made larger ("space freed"), the run resumes."""
    model_bytes = (REFERENCE / "tiny_odd/model.safetensors").stat().st_size
    out = tmp_path / "disk"
    # A checkpoint holds the weights, and AdamW's two moments of each: three times the model.
    if not mount_small_disk(out, int(1.5 * 3 * model_bytes)):
        pytest.skip("cannot mount a tmpfs here (needs root): the planted full disk above stands in for it")
    try:
        with pytest.MonkeyPatch.context() as m:
            assert full_disk_run(small_massive, out, "checkpoint.safetensors",
                                 lambda: disk_fills_up(m, "checkpoint.safetensors", NEVER)) == []
        assert mount_small_disk(out, 16 * 2**20)
        assert train.main(tiny_args(small_massive, out, "--resume")) == out
        assert outcome(out) == whole_run
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_a_full_disk_while_the_tokenizer_is_written(tmp_path):
    """The tokenizers library writes tokenizer.json itself and, on a full disk, raises a bare
    Exception in the system's words after writing part of the file."""
    class FullDiskBackend:
        def save(self, path):
            Path(path).write_bytes(b'{"version": "1.0", "trunc')
            raise Exception("No space left on device (os error 28)")  # noqa: TRY002 (what the library raises)

    path = tmp_path / "tokenizer.json"
    path.write_text("previous")
    with pytest.raises(WriteError, match=r"^cannot write .*tokenizer.json \(No space left on device\); the previous "
                                         r"tokenizer.json is kept: free space and run the command again$"):
        runs.save_tokenizer(path, type("Tokenizer", (), {"backend": FullDiskBackend()})())
    assert path.read_text() == "previous" and not path.with_name("tokenizer.json.tmp").exists()
