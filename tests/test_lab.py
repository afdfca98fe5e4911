"""The lab's diagnostics on small runs."""

import pytest
import torch

import train
from lab import stage1
from minibert.representations import embed
from tests.cases import REFERENCE


def test_stage1_reads_the_encoder_at_the_end_of_the_contrastive_stage(small_massive, tmp_path, monkeypatch):
    """A SimCLR run stopped after its one contrastive epoch: the vectors lab.stage1 measures are
    the stage-1 encoder's own, not the pretrained ones."""
    out = tmp_path / "run"
    argv = ["--model", str(REFERENCE / "tiny_odd"), "--max-len", "16", "--data", str(small_massive), "--out", str(out),
            "--loss", "simclr", "--contrastive-epochs", "1", "--epochs", "1", "--lr", "1e-3"]
    run = train.setup(train.parse_args(argv))
    train.train_epoch(run, 0)  # stage 1, and its checkpoint
    split = run.splits["test"]
    trained = embed(run.model, split)
    (out / "stage1.safetensors").write_bytes(run.checkpoint.read_bytes())
    seen = {}
    real_embed = stage1.embed
    monkeypatch.setattr(stage1, "embed", lambda model, encoded: seen.setdefault(len(seen), real_embed(model, encoded)))
    result = stage1.main([str(out / "stage1.safetensors"), "--model", str(REFERENCE / "tiny_odd"),
                          "--data", str(small_massive), "--out", str(out / "stage1.json")])
    assert torch.allclose(seen[1], trained, atol=1e-6)  # the test split's vectors: the trained encoder's
    assert result["epoch"] == 1 and 0 <= result["knn_accuracy"] <= 1
    train.train_epoch(run, 1)  # the classifier epoch overwrites the checkpoint: no longer stage 1's
    with pytest.raises(SystemExit, match="epoch 2 of a run whose stage 1 has 1"):
        stage1.main([str(run.checkpoint), "--model", str(REFERENCE / "tiny_odd"), "--data", str(small_massive)])
