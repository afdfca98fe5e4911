"""MASSIVE en-US: the official counts, fixed labels, and errors that name the file and line."""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from minibert import data
from minibert.fetch import DownloadError

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"id": "0", "locale": "en-US", "partition": "train", "scenario": "alarm",
        "intent": "alarm_set", "utt": "wake me up at five am"}


def test_official_counts(massive_path):
    massive = data.load_massive(massive_path)
    assert (len(massive.train), len(massive.dev), len(massive.test)) == (11_514, 2_033, 2_974)
    assert massive.labels == data.SCENARIOS and len(massive.labels) == 18
    assert list(massive.labels) == sorted(massive.labels)
    counts = {name: 0 for name in massive.labels}
    for example in massive.test:
        counts[example.label] += 1
    assert counts["calendar"] == 402 and counts["takeaway"] == 57


def test_intent_labels(massive_path):
    massive = data.load_massive(massive_path, labels="intent")
    assert len(massive.labels) == 60
    ids = massive.label_ids(massive.train[:3])
    assert all(massive.labels[i] == e.intent for i, e in zip(ids, massive.train[:3]))


def check_label_order(path):
    """The scenario labels, the intents and the intent labels are sorted names, and each intent's
    group is its scenario's index: one order, whatever the order of the lines or of a set."""
    scenarios = data.load_massive(path)
    intents = sorted({e.intent for split in (scenarios.train, scenarios.dev, scenarios.test) for e in split})
    scenario_of = {e.intent: e.label for split in (scenarios.train, scenarios.dev, scenarios.test) for e in split}
    assert list(scenarios.labels) == sorted(data.SCENARIOS)
    assert list(scenarios.intents) == intents
    assert scenarios.intent_groups() == [sorted(data.SCENARIOS).index(scenario_of[i]) for i in intents]
    assert list(data.load_massive(path, labels="intent").labels) == intents


LABELS_OF_ONE_PROCESS = """
import json, sys
from minibert.data import load_massive
scenarios = load_massive(sys.argv[1])
print(json.dumps([scenarios.labels, scenarios.intent_groups(), load_massive(sys.argv[1], labels="intent").labels]))
"""


def test_label_order_is_fixed_whatever_the_hash_seed(massive_path):
    """A label is an index into the label names: an order that came from a set would change with
    the string hash seed of each process, and a saved model would read another process's labels
    wrong. Two processes of different seeds print what this one computes."""
    check_label_order(massive_path)
    scenarios = data.load_massive(massive_path)
    here = [list(scenarios.labels), scenarios.intent_groups(), list(data.load_massive(massive_path, "intent").labels)]
    processes = [subprocess.Popen([sys.executable, "-c", LABELS_OF_ONE_PROCESS, str(massive_path)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
                 for seed in ("1", "2")]
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        assert json.loads(out) == here


def write_lines(tmp_path, lines):
    path = tmp_path / "en-US.jsonl"
    path.write_text("\n".join(lines))
    return path


def good_lines():
    return [json.dumps({**GOOD, "partition": p}) for p in ("train", "dev", "test")]


@pytest.mark.parametrize("bad_line, message", [
    ('{"partition": "train", oops', r"en-US.jsonl:2: not valid JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "utt"}), r"en-US.jsonl:2: missing or non-string field 'utt'"),
    (json.dumps({**GOOD, "partition": "validation"}), r"en-US.jsonl:2: unknown partition 'validation'"),
    (json.dumps({**GOOD, "scenario": "banking"}), r"en-US.jsonl:2: unknown scenario 'banking'"),
    (json.dumps({**GOOD, "intent": "music_play"}), r"en-US.jsonl:2: intent 'music_play' is not of scenario 'alarm'"),
    ("[1, 2]", r"en-US.jsonl:2: expected a JSON object"),
])
def test_malformed_line_is_named(tmp_path, bad_line, message):
    lines = good_lines()
    lines.insert(1, bad_line)
    with pytest.raises(ValueError, match=message):
        data.load_massive(write_lines(tmp_path, lines))


def test_empty_or_missing_file(tmp_path):
    with pytest.raises(ValueError, match="en-US.jsonl: no train examples"):
        data.load_massive(write_lines(tmp_path, []))
    with pytest.raises(ValueError, match="make data"):
        data.load_massive(tmp_path / "nowhere.jsonl")


def test_fetch_copies_and_verifies(massive_path, tmp_path):
    dest = data.fetch_massive(tmp_path / "en-US.jsonl", source=massive_path)
    assert dest.read_bytes() == massive_path.read_bytes()
    with pytest.raises(DownloadError, match="does not match"):
        data.fetch_massive(tmp_path / "other.jsonl", source=write_lines(tmp_path, good_lines()))
    assert not (tmp_path / "other.jsonl").exists()


def test_fetch_extracts_from_the_official_tarball_layout(massive_path, tmp_path, monkeypatch):
    monkeypatch.delenv("MASSIVE_JSONL", raising=False)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(massive_path, arcname=data.TARBALL_MEMBER)
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/amazon-massive-dataset-1.1.tar.gz"
    try:
        with pytest.raises(DownloadError, match="does not match"):
            data.fetch_massive(tmp_path / "a.jsonl", url=url, tarball_sha256="f" * 64)
        dest = data.fetch_massive(tmp_path / "b.jsonl", url=url, tarball_sha256=hashlib.sha256(body).hexdigest())
        assert dest.read_bytes() == massive_path.read_bytes()
    finally:
        server.shutdown()
