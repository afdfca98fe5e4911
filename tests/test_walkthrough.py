"""`python -m minibert walkthrough`: the command prints each section, and the step it shows is
train.py's first step: the same loss and logits, on a data set whose train split is that one
sentence with its label."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minibert.training
import train
from minibert.walkthrough import walkthrough

SENTENCE, LABEL = "wake me up at seven", "alarm"
SECTIONS = ("minibert/training.py · build_models", "1. minibert/tokenizer.py · Tokenizer.encode",
            "2. minibert/model.py · Embeddings.forward", "3. minibert/model.py · Layer.forward",
            "4. minibert/classifier.py · ScenarioClassifier.forward", "5. minibert/training.py · train_step")


@pytest.fixture(scope="module")
def walked(minilm_dir):
    """→ (loss, logits, printed text) of the walkthrough, called from Python."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        loss, logits = walkthrough(SENTENCE, LABEL, str(minilm_dir), seed=0)
    return loss, logits, text.getvalue()


def test_the_command_prints_every_section_in_the_reading_order(minilm_dir, walked):
    done = subprocess.run([sys.executable, "-m", "minibert", "walkthrough", SENTENCE, "--model", str(minilm_dir)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    where = [done.stdout.index(title) for title in SECTIONS]
    assert where == sorted(where)
    assert "[CLS]  wake    me    up    at  seven  [SEP]" in done.stdout
    printed = float(re.search(r"-log p\(alarm\) = (\S+)", done.stdout).group(1))
    assert printed == pytest.approx(walked[0].item(), abs=1e-5)
    assert walked[2].count("max |diff|") >= 2  # the embeddings' and the layers' checks ran


def test_its_step_is_train_pys_first_step(minilm_dir, walked, tmp_path, monkeypatch):
    # A MASSIVE file (so the head has MASSIVE's 18 scenarios, in their order) whose train split is
    # the one sentence: train.py's first batch, with --batch-size 1.
    lines = [("train", LABEL, "alarm_set", SENTENCE), ("dev", "weather", "weather_query", "is it going to rain"),
             ("test", "music", "music_query", "what song is this")]
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps(dict(zip(("partition", "scenario", "intent", "utt"), line))) + "\n"
                            for line in lines))
    steps = []

    def recorded(model, batch):
        loss, logits = paper_loss(model, batch)
        steps.append((loss.detach().clone(), logits.detach().clone()))
        return loss, logits

    paper_loss = minibert.training.paper_loss
    monkeypatch.setattr(minibert.training, "paper_loss", recorded)
    train.main(["--experiment", "baseline", "--data", str(data), "--model", str(minilm_dir), "--seed", "0",
                "--batch-size", "1", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
                "--out", str(tmp_path / "run")])
    (loss, logits), = steps
    walked_loss, walked_logits, _ = walked
    assert logits.shape == walked_logits.shape == (1, 18)
    torch.testing.assert_close(walked_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(walked_loss, loss, rtol=1e-5, atol=0.0)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["train_loss"] == pytest.approx(walked_loss.item(), rel=1e-5)  # one step: the epoch's loss
