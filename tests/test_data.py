"""MASSIVE en-US: the official counts, fixed labels, and errors that name the file and line."""

import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from minibert import data
from minibert.fetch import DownloadError

GOOD = {"id": "0", "locale": "en-US", "partition": "train", "scenario": "alarm",
        "intent": "alarm_set", "utt": "wake me up at five am"}


def test_official_counts(massive_path):
    massive = data.load_massive(massive_path)
    assert (len(massive.train), len(massive.dev), len(massive.test)) == (11_514, 2_033, 2_974)
    assert massive.labels == data.SCENARIOS and len(massive.labels) == 18
    assert list(massive.labels) == sorted(massive.labels)
    counts = {name: 0 for name in massive.labels}
    for example in massive.test:
        counts[example.scenario] += 1
    assert counts["calendar"] == 402 and counts["takeaway"] == 57


def test_intent_labels(massive_path):
    massive = data.load_massive(massive_path, labels="intent")
    assert len(massive.labels) == 60
    ids = massive.label_ids(massive.train[:3], "intent")
    assert all(massive.labels[i] == e.intent for i, e in zip(ids, massive.train[:3]))


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
