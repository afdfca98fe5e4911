"""Weights: the strict loader refuses bad checkpoints by name, and the real download code is
exercised against a local server laid out like the Hugging Face hub."""

import hashlib
import http.server
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibert import weights
from minibert.fetch import DownloadError
from minibert.model import BertConfig, BertModel
from tests import cases

TINY = cases.REFERENCE / "tiny_odd"


def tiny_model(**overrides):
    return BertModel(BertConfig(**{**BertConfig.from_json(TINY / "config.json").to_dict(), **overrides}))


def write_state(tmp_path, edit):
    state = load_file(TINY / "model.safetensors")
    edit(state)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path


def test_bert_base_layout_is_accepted_and_extras_ignored():
    model, _, _ = weights.load_pretrained(str(cases.REFERENCE / "tiny_bert_layout"))
    assert model.pooler is not None


def test_missing_key_is_named(tmp_path):
    path = write_state(tmp_path, lambda s: s.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(ValueError, match=r"model.safetensors: missing key 'encoder.layer.1.output.dense.bias'"):
        weights.load_state(tiny_model(), path)


def test_unexpected_key_is_named(tmp_path):
    path = write_state(tmp_path, lambda s: s.update({"encoder.layer.0.attention.self.rotary.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected key 'encoder.layer.0.attention.self.rotary.weight'"):
        weights.load_state(tiny_model(), path)


def test_extra_layer_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unexpected key 'encoder.layer.1.*the model has no 'layers.1"):
        weights.load_state(tiny_model(num_hidden_layers=1), TINY / "model.safetensors")


def test_shape_mismatch_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"key 'embeddings.word_embeddings.weight' has shape \(99, 36\), "
                                         r"the config needs \(98, 36\)"):
        weights.load_state(tiny_model(vocab_size=98), TINY / "model.safetensors")


def test_corrupt_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        weights.load_state(tiny_model(), path)


def test_without_pooler_the_pooler_keys_are_dropped():
    model = tiny_model()
    model.pooler = None
    weights.load_state(model, TINY / "model.safetensors")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'bert-large'"):
        weights.resolve("bert-large")


class Hub(http.server.BaseHTTPRequestHandler):
    """Serves `files` at /{repo}/resolve/{revision}/{name}; names in `drop` stop half-way."""

    files, drop = {}, set()

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if "/resolve/" not in self.path or name not in self.files:
            self.send_error(404)
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if name in self.drop else body)
        self.wfile.flush()
        if name in self.drop:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    Hub.files, Hub.drop = {}, set()
    yield Hub
    server.shutdown()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def tiny_hub_model(hub, **digests):
    """The tiny bert-base-layout checkpoint, served as a hub repo; `digests` override sha256s."""
    folder = cases.REFERENCE / "tiny_bert_layout"
    names = {"config.json": "config.json", "vocab.txt": "vocab.txt", "model.safetensors": "model.safetensors"}
    hub.files = {name: (folder / src).read_bytes() for name, src in names.items()}
    files = {name: sha(data) for name, data in hub.files.items()}
    files.update(digests)
    return weights.HubModel(repo="org/tiny", revision="0" * 40, files=files)


def test_download_good_files(hub, tmp_path):
    tiny_hub_model(hub).fetch(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert not list(tmp_path.glob("*.part"))


def test_download_wrong_hash_deletes_and_fails(hub, tmp_path):
    model = tiny_hub_model(hub, **{"model.safetensors": "0" * 64})
    with pytest.raises(DownloadError, match="sha256 .* does not match the expected 0000"):
        model.fetch(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.part"))


def test_download_dropped_mid_file_leaves_nothing(hub, tmp_path):
    model = tiny_hub_model(hub)
    hub.drop = {"model.safetensors"}
    with pytest.raises(DownloadError, match="model.safetensors"):
        model.fetch(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.part"))
    hub.drop = set()
    model.fetch(tmp_path)  # a later try completes what is missing
    assert (tmp_path / "model.safetensors").read_bytes() == hub.files["model.safetensors"]


def test_download_404(hub, tmp_path):
    model = tiny_hub_model(hub)
    del hub.files["vocab.txt"]
    with pytest.raises(DownloadError, match="vocab.txt: HTTP 404"):
        model.fetch(tmp_path)


def test_auto_takes_bert_base_when_the_hub_serves_it(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setitem(weights.MODELS, "bert-base-uncased", tiny_hub_model(hub))
    model, tokenizer, config = weights.load_pretrained("auto")
    assert model.name == "bert-base-uncased" and config.hidden_size == 24


def test_auto_falls_back_to_embedded_model_and_says_so(minilm_dir, tmp_path, monkeypatch, capsys):
    closed = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    port = closed.server_port
    closed.server_close()  # nothing listens there now: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "all-MiniLM-L6-v2").symlink_to(minilm_dir)
    assert weights.resolve("auto")[0] == "all-MiniLM-L6-v2"
    assert "bert-base-uncased unavailable" in capsys.readouterr().err
    with pytest.raises(DownloadError):  # a model named explicitly never falls back
        weights.resolve("bert-base-uncased")


def test_compact_fp16_copy_loads_and_stays_close(tmp_path):
    dest = weights.write_compact(str(TINY), tmp_path / "tiny-fp16")
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (TINY / "model.safetensors").stat().st_size
    full, _, _ = weights.load_pretrained(str(TINY))
    half, _, _ = weights.load_pretrained(str(dest))
    io = load_file(TINY / "io.safetensors")
    with torch.no_grad():
        a = full.eval()(io["input_ids"], io["attention_mask"], io["token_type_ids"])
        b = half.eval()(io["input_ids"], io["attention_mask"], io["token_type_ids"])
    assert next(half.parameters()).dtype == torch.float32
    assert (a - b).abs().max() < 1e-2  # fp16 keeps ~3 decimal digits of each weight


def test_compact_copy_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a failed write (a full disk) as its own error, not an OSError; nothing
    of the copy is left, so the same command runs again once there is room."""
    from safetensors import SafetensorError

    def full_disk(tensors, path):
        path.write_bytes(b"\x00" * 100)  # what was written before the disk filled
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    real = weights.save_file
    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(ValueError, match="cannot write there .*No space left on device.*run it again"):
        weights.write_compact(str(TINY), tmp_path / "tiny-fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(weights, "save_file", real)
    dest = weights.write_compact(str(TINY), tmp_path / "tiny-fp16")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
