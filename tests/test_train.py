"""train.py and evaluate.py end to end, on a small slice of MASSIVE with the embedded model."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluate
import train
from minibert import device
from minibert.runs import read_json
from tests import cpu
from tests.cases import REFERENCE

ROOT = Path(__file__).resolve().parents[1]


def args(data, out, *extra):
    return ["--model", "all-MiniLM-L6-v2", "--data", str(data), "--out", str(out), "--epochs", "3",
            "--log-every", "2", *extra]


def outcome(run_dir):
    """What must be identical between two runs: every metric but the clock."""
    results = read_json(run_dir / "results.json")
    history = [{k: v for k, v in row.items() if "second" not in k}
               for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    return results["test"], history


@pytest.fixture(scope="module")
def finished_run(small_massive, minilm_dir, tmp_path_factory):
    return train.main(args(small_massive, tmp_path_factory.mktemp("runs") / "a"))


def test_run_folder_is_complete(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"results.json", "metrics.jsonl", "model.safetensors", "model.json", "tokenizer.json"} <= names
    assert "checkpoint.safetensors" not in names  # finished: the training state is cleaned up
    results = read_json(finished_run / "results.json")
    assert results["model"] == "all-MiniLM-L6-v2" and results["hyperparameters"]["epochs"] == 3
    assert len(results["dev_accuracy_per_epoch"]) == 3
    assert results["test"]["n_batches"] == 3  # 48 sentences in the paper's batches of 16
    assert results["all_params"] == 22_713_216  # the pooler is counted, frozen: the head reads [CLS]
    assert results["trainable_params"] == 22_713_216 - 384 * 384 - 384


def test_same_seed_same_metrics(finished_run, small_massive, tmp_path):
    again = train.main(args(small_massive, tmp_path / "b"))
    assert outcome(again) == outcome(finished_run)


def kill_at(cmd, line_start):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(line_start):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"never saw {line_start!r}"


def test_killed_mid_epoch_then_resumed_ends_identically(finished_run, small_massive, tmp_path):
    out = tmp_path / "killed"
    kill_at([sys.executable, "-u", str(ROOT / "train.py"), *args(small_massive, out, "--log-every", "1")],
            "epoch 2/3 step 3/6")  # half-way through the second epoch
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    train.main(args(small_massive, out, "--resume"))
    assert outcome(out) == outcome(finished_run)


@pytest.mark.parametrize("experiment, extra, kill", [
    # killed in the second of two contrastive epochs: the contrastive optimizer state comes back
    ("simclr", ["--epochs", "1", "--contrastive-epochs", "2"], "epoch 2/3 step 2/6"),
    # killed in the first classifier epoch, right after the contrastive stage's last checkpoint
    ("simclr", ["--epochs", "2", "--contrastive-epochs", "2"], "epoch 3/4 step 2/6"),
    # SWA from int(0.25 · 4) = 1 averages after epochs 2 and 3 (0-based): killed in epoch 3,
    # with one epoch in the average, which must come back too
    ("both", ["--epochs", "4", "--swa-start", "0.25"], "epoch 4/4 step 2/6"),
    ("lora20", ["--epochs", "2"], "epoch 2/2 step 2/6"),
    # fp16: the gradient scaler's scale and growth tracker come back with the weights (on the
    # tiny BERT: fp16 matmuls are slow on a CPU)
    ("baseline", ["--epochs", "2", "--precision", "fp16", "--model", str(ROOT / "tests/reference/tiny_odd"),
                  "--max-len", "16"], "epoch 2/2 step 2/6"),
])
def test_resume_restores_every_kind_of_state(experiment, extra, kill, small_massive, minilm_dir, tmp_path):
    common = [*args(small_massive, tmp_path / "x"), "--experiment", experiment, *extra, "--log-every", "1"]
    whole = train.main([*common[:common.index("--out")], "--out", str(tmp_path / "whole"),
                        *common[common.index("--out") + 2:]])
    killed = tmp_path / "x"
    kill_at([sys.executable, "-u", str(ROOT / "train.py"), *common], kill)
    train.main([*common, "--resume"])
    assert outcome(killed) == outcome(whole)


def test_presets_record_what_they_did(small_massive, minilm_dir, tmp_path):
    swa = read_json(train.main([*args(small_massive, tmp_path / "swa"), "--experiment", "swa", "--epochs", "2",
                                "--swa-start", "0"]) / "results.json")
    assert swa["swa"]["n_averaged"] == 1  # epoch 1 (0-based) is past int(0 · 2) = 0
    lora = train.main([*args(small_massive, tmp_path / "lora"), "--experiment", "lora30", "--epochs", "1"])
    results = read_json(lora / "results.json")
    assert results["trainable_params"] == 9_216 * 30  # 2 · r · 384 · 2 modules · 6 layers
    assert results["all_params"] == 22_713_216 + 9_216 * 30
    # The adapters and the head are saved together, and reloading predicts the same.
    evaluate.main([str(lora), "--data", str(small_massive)])
    again = read_json(lora / "eval-test.json")
    assert (again["accuracy"], again["loss"]) == (results["test"]["accuracy"], results["test"]["loss"])
    probe = read_json(train.main([*args(small_massive, tmp_path / "probe"), "--experiment", "supcon",
                                  "--epochs", "1", "--stage2", "probe", "--no-test"]) / "results.json")
    assert len(probe["contrastive_loss_per_epoch"]) == 1 and len(probe["dev_accuracy_per_epoch"]) == 1
    assert probe["test"] is None and probe["dev"]["accuracy"] == probe["dev_accuracy_per_epoch"][-1]
    # The paper's loss for a contrastive row: stage 1's loss, its head kept; never test under --no-test.
    assert set(probe["contrastive"]) == {"dev_contrastive_loss", "dev_contrastive_loss_paper_sum"}
    assert probe["contrastive"]["dev_contrastive_loss_paper_sum"] == pytest.approx(
        3 * probe["contrastive"]["dev_contrastive_loss"])  # 48 dev sentences: 3 batches of 16
    assert (tmp_path / "probe" / "projection.safetensors").exists()


def right_one_by_one(model, tokenizer, data, max_len, labels):
    """→ (right, n): how many test sentences of the jsonl `data` the classifier's largest logit
    labels as their `scenario`, each sentence run alone (no batch, no padding, no sorting by
    length), in eval mode; counted here, in Python, apart from minibert's predict and metrics."""
    model.eval()
    right = n = 0
    with torch.no_grad():
        for record in map(json.loads, data.read_text().splitlines()):
            if record["partition"] == "test":
                input_ids, attention_mask = tokenizer([record["utt"]], max_len=max_len)
                scores = model(input_ids, attention_mask)[0].tolist()
                right += labels[scores.index(max(scores))] == record["scenario"]
                n += 1
    return right, n


def test_evaluate_reproduces_the_recorded_accuracy(finished_run, small_massive, capsys):
    """The accuracy train.py recorded and the one evaluate.py measures again are the count of
    test sentences the saved model gets right, counted here one sentence at a time."""
    from minibert.runs import load_model

    evaluate.main([str(finished_run), "--split", "test", "--data", str(small_massive)])
    model, tokenizer, meta = load_model(finished_run)
    right, n = right_one_by_one(model, tokenizer, small_massive, meta["max_len"], meta["labels"])
    assert n == 48
    # Both figures are float32 means of 0s and 1s: within 1e-7 of right / n, while one sentence
    # more or less right moves them by 1 / 48 = 0.02.
    for record in (read_json(finished_run / "results.json")["test"], read_json(finished_run / "eval-test.json")):
        assert abs(record["accuracy"] - right / n) < 1e-6
    assert "most_confused" in read_json(finished_run / "eval-test.json")
    evaluate.main([str(finished_run), "--predict", "wake me up at seven"])
    label, probability = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert label in read_json(finished_run / "model.json")["labels"] and 0 < float(probability.strip("()")) <= 1


def test_zero_shot_lands_near_chance(small_massive, minilm_dir, tmp_path):
    """The zero-shot accuracy is what the untrained classifier, rebuilt here from the same seed,
    gets right counted one sentence at a time; and that count is chance's."""
    from minibert.classifier import ScenarioClassifier
    from minibert.data import SCENARIOS
    from minibert.weights import load_pretrained

    evaluate.main(["--zero-shot", "--model", "all-MiniLM-L6-v2", "--data", str(small_massive), "--out", str(tmp_path)])
    results = read_json(tmp_path / "results.json")
    assert results["experiment"] == "zeroshot"
    recipe = results["hyperparameters"]
    torch.manual_seed(recipe["seed"])  # then the same draws as evaluate.py: the encoder, then the head
    encoder, tokenizer, _ = load_pretrained("all-MiniLM-L6-v2")
    model = ScenarioClassifier(encoder, len(SCENARIOS), recipe["hidden_dim"], recipe["drop_rate"],
                               pooling=recipe["pooling"])
    right, n = right_one_by_one(model, tokenizer, small_massive, recipe["max_len"], SCENARIOS)
    assert n == 48 and abs(results["test"]["accuracy"] - right / n) < 1e-6  # float32 mean; 1/48 a sentence
    # Guesses unrelated to the sentence are right with probability 1/18 each: the count right is
    # Binomial(48, 1/18), mean 2.7, and P(count ≤ 8) = 0.9988 (a one-sided 99.9 % bound; the
    # lower end of the two-sided interval is 0, with P(count = 0) = 0.064).
    assert right <= 8
    # Run again into its own folder, as `make paper` does: the record is rewritten, the same; also
    # a record older than --pooling, which ran [CLS] pooling without recording it.
    older = {**results, "hyperparameters": {k: v for k, v in recipe.items() if k != "pooling"}}
    (tmp_path / "results.json").write_text(json.dumps(older))
    evaluate.main(["--zero-shot", "--model", "all-MiniLM-L6-v2", "--data", str(small_massive), "--out", str(tmp_path)])
    assert read_json(tmp_path / "results.json")["test"] == results["test"]


def test_existing_run_is_not_overwritten(finished_run, small_massive):
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(args(small_massive, finished_run))


def test_resume_with_other_hyperparameters_is_refused(small_massive, minilm_dir, tmp_path, monkeypatch):
    stop_after_first_epoch(monkeypatch)
    with pytest.raises(SystemExit, match="interrupted"):
        train.main(args(small_massive, tmp_path))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"other hyperparameters \(lr: 0.0001 → 0.001\)"):
        train.main(args(small_massive, tmp_path, "--resume", "--lr", "1e-3"))


@pytest.mark.parametrize("started_on, resumed_on", [("fp32-only", "native-bf16"), ("native-bf16", "fp32-only")])
def test_resume_with_other_precision_or_processes_is_refused(started_on, resumed_on, small_massive, tmp_path,
                                                             monkeypatch):
    """A run started with the default precision on one kind of CPU, resumed with the same flags on
    the other kind, where the default differs: refused, with the flag that resumes it."""
    started, other = ("fp32", "bf16") if started_on == "fp32-only" else ("bf16", "fp32")
    out = tmp_path / "run"
    stop_after_first_epoch(monkeypatch)
    cpu.answer_as(started_on, monkeypatch)
    with pytest.raises(SystemExit, match="interrupted"):
        train.main(tiny(small_massive, out, "--epochs", "3"))
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=f"trained with precision {started}, not {other}"):
        train.main(tiny(small_massive, out, "--epochs", "3", "--resume", "--precision", other))
    cpu.answer_as(resumed_on, monkeypatch)
    with pytest.raises(SystemExit, match=f"trained with precision {started}, not {other}; pass --precision {started} "
                                         "to resume"):
        train.main(tiny(small_massive, out, "--epochs", "3", "--resume"))
    monkeypatch.undo()
    from minibert.runs import checkpoint_state, load_tensors, save_tensors

    tensors, _ = load_tensors(out / "checkpoint.safetensors")
    state = checkpoint_state(out / "checkpoint.safetensors")
    save_tensors(out / "checkpoint.safetensors", tensors, {"state": json.dumps({**state, "processes": 2})})
    with pytest.raises(SystemExit, match="trained with processes 2, not 1"):
        train.main(tiny(small_massive, out, "--epochs", "3", "--resume", "--precision", started))


def stop_after_first_epoch(monkeypatch):
    real = train.save_checkpoint

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise SystemExit("interrupted")

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(small_massive, minilm_dir, tmp_path, monkeypatch):
    real, calls = F.cross_entropy, []

    def poisoned(logits, labels, **kwargs):
        calls.append(1)
        loss = real(logits, labels, **kwargs)
        return loss * float("nan") if len(calls) > 8 else loss  # epoch 2, step 3

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(SystemExit, match=r"loss became nan at epoch 2.*checkpoint of epoch 1 is kept"):
        train.main(args(small_massive, tmp_path))
    assert (tmp_path / "checkpoint.safetensors").exists()
    assert not (tmp_path / "results.json").exists()


def test_bad_flags_and_run_folders(finished_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "three"])
    assert e.value.code == 2 and "invalid int value: 'three'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model.json: missing; is .* a run folder"):
        evaluate.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="was trained from all-MiniLM-L6-v2, not bert-base-uncased"):
        evaluate.main([str(finished_run), "--model", "bert-base-uncased"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "tokenizer.json"):
        (broken / name).write_bytes((finished_run / name).read_bytes())
    with pytest.raises(SystemExit, match="model.safetensors: cannot read"):
        evaluate.main([str(broken)])


def test_label_map_must_match_the_data(finished_run, small_massive, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for p in finished_run.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    meta = read_json(copy / "model.json")
    meta["labels"] = meta["labels"][::-1]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="labels do not match"):
        evaluate.main([str(copy), "--data", str(small_massive)])


@pytest.mark.parametrize("avx512_bf16, amx, faster, expected", [
    (False, False, True, "fp32"),   # AVX2 only: bf16 is emulated
    (True, False, True, "bf16"), (False, True, True, "bf16"),
    (True, True, False, "fp32"),    # native, but the one-off check finds it slower here
])
def test_the_default_precision_is_bf16_where_the_cpu_runs_it(avx512_bf16, amx, faster, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)  # as torch would report
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)             # such a CPU
    monkeypatch.setattr(device, "bf16_pays_off", lambda device: faster)
    here = torch.device("cpu")
    assert device.pick_precision(here, "auto") == expected
    assert device.pick_precision(here, "fp32") == "fp32" and device.pick_precision(here, "bf16") == "bf16"


def test_under_torchrun_process_0_decides_the_precision(monkeypatch):
    """Process 1 finds bf16 slower here, process 0 faster: both train as process 0 decided."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(device, "bf16_pays_off", lambda device: False)  # this process's own timing

    def from_process_0(objects):
        objects[:] = ["bf16"]

    monkeypatch.setattr(device.dist, "broadcast_object_list", from_process_0)
    assert device.pick_precision(torch.device("cpu"), "auto", world=2) == "bf16"
    assert device.pick_precision(torch.device("cpu"), "auto", world=1) == "fp32"


def test_a_run_records_its_cpu_and_the_precision_it_chose(tiny_model, small_massive, tmp_path, monkeypatch):
    from minibert.device import cpu_model

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(device, "bf16_pays_off", lambda device: True)
    run = train.main(tiny(small_massive, tmp_path / "run", "--epochs", "1"))
    results = read_json(run / "results.json")
    assert (results["precision"], results["native_bf16"], results["eval_precision"]) == ("bf16", True, "fp32")
    assert results["device"].startswith(f"cpu ({cpu_model()}, ") and cpu_model()
    assert len(results["git_commit"]) == 40 and isinstance(results["git_dirty"], bool)


def test_a_run_records_the_code_it_started_with(small_massive, tmp_path, monkeypatch):
    """A run of hours outlives commits: the record names the commit its process loaded, not the
    one checked out when it finished."""
    from minibert import runs

    head = ["a" * 40]
    checkout = lambda: {"git_commit": head[0], "git_dirty": False}  # noqa: E731
    monkeypatch.setattr(train, "code_version", checkout)
    monkeypatch.setattr(runs, "code_version", checkout)
    train_epoch = train.train_epoch

    def epoch_then_commit(run, epoch):
        train_epoch(run, epoch)
        head[0] = "b" * 40  # a commit lands while the run trains

    monkeypatch.setattr(train, "train_epoch", epoch_then_commit)
    run = train.main(tiny(small_massive, tmp_path / "run", "--epochs", "1"))
    assert read_json(run / "results.json")["git_commit"] == "a" * 40


def test_device_and_precision_are_chosen_once():
    assert device.pick_device("cpu") == torch.device("cpu")
    assert device.bf16_pays_off(torch.device("cpu")) in (True, False)  # it runs, whatever it finds
    autocast, scaler = device.autocast_and_scaler(torch.device("cpu"), "bf16", fast=False)
    assert scaler is None
    with autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    assert device.autocast_and_scaler(torch.device("cpu"), "fp16", fast=False)[1] is not None


def test_the_fast_path_is_on_by_default_on_one_gpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not device.pick_fast(cpu, None, "fp32", 1)
    assert device.pick_fast(gpu, None, "bf16", 1) and device.pick_fast(gpu, None, "fp32", 1)
    assert not device.pick_fast(gpu, None, "fp16", 1) and not device.pick_fast(gpu, None, "bf16", 2)
    assert device.pick_fast(cpu, True, "fp32", 1)
    with pytest.raises(ValueError, match="--fast cannot run with --precision fp16"):
        device.pick_fast(cpu, True, "fp16", 1)
    with pytest.raises(ValueError, match="--fast cannot run with 2 processes"):
        device.pick_fast(gpu, True, "bf16", 2)


def test_embedding_analysis_with_and_without_matplotlib(finished_run, small_massive, monkeypatch, capsys):
    evaluate.main([str(finished_run), "--embeddings", "--data", str(small_massive)])
    result = read_json(finished_run / "embeddings.json")
    assert 0 <= result["alignment"] <= 4 and result["uniformity"] <= 0 and 0 <= result["knn_accuracy"] <= 1
    assert (finished_run / "embeddings-pca.png").stat().st_size > 1000
    (finished_run / "embeddings-pca.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    evaluate.main([str(finished_run), "--embeddings", "--data", str(small_massive)])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert read_json(finished_run / "embeddings.json")["knn_accuracy"] == result["knn_accuracy"]
    assert not (finished_run / "embeddings-pca.png").exists()


def torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("stage2, extra", [
    ("finetune", []), ("probe", []), ("finetune", ["--supervise", "both"]),
    # R-Drop's KL is a sum over the batch: each process must scale its share like the loss's.
    ("finetune", ["--supervise", "intents", "--rdrop", "4", "--drop-rate", "0.5"]),
], ids=["finetune", "probe", "supervise-both", "intents-rdrop"])
def test_two_processes_compute_one_process_gradient(stage2, extra, tiny_model, small_massive, tmp_path):
    """A ragged batch of 5 shared 3 + 2: the gradient two processes apply (DDP's average of
    each process's) is the one-process gradient of the batch's mean loss, for the whole
    classifier and for a probe's head alone (tests/one_step.py keys the head's dropout masks to
    the sentences, so one process and two drop the same units)."""
    check_two_processes_compute_one_process_gradient(stage2, extra, tiny_model, small_massive, tmp_path)


def check_two_processes_compute_one_process_gradient(stage2, extra, tiny_model, small_massive, tmp_path):
    from safetensors.torch import load_file

    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--drop-rate", "0",
              "--stage2", stage2, "--precision", "fp32", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    subprocess.run([sys.executable, "tests/one_step.py", str(tmp_path / "one.safetensors"), *common,
                    "--out", str(tmp_path / "one")], cwd=ROOT, env=env, check=True, capture_output=True)
    torchrun("tests/one_step.py", str(tmp_path / "two.safetensors"), *common, "--out", str(tmp_path / "two"))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(one) == set(two) and (stage2 == "finetune") == any(k.startswith("encoder.") for k in one)
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-4, atol=1e-7), name


def test_two_gloo_processes_match_one(tiny_model, small_massive, tmp_path):
    """torchrun with 2 CPU processes, each on half of every batch, ends where one process does,
    and records the whole batch's loss, not the first process's share."""
    common = ["--model", str(tiny_model), "--data", str(small_massive), "--max-len", "16", "--epochs", "2",
              "--drop-rate", "0", "--lr", "1e-3", "--experiment", "swa", "--swa-start", "0", "--precision", "fp32"]
    one = train.main([*common, "--out", str(tmp_path / "one")])
    torchrun(str(ROOT / "train.py"), *common, "--out", str(tmp_path / "two"))
    a, b = read_json(one / "results.json"), read_json(tmp_path / "two" / "results.json")
    assert "2 processes" in b["device"]
    assert b["test"]["accuracy"] == a["test"]["accuracy"]
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], abs=1e-5)
    assert b["dev_accuracy_per_epoch"] == a["dev_accuracy_per_epoch"]
    assert b["train_accuracy_per_epoch"] == a["train_accuracy_per_epoch"]
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (one, tmp_path / "two")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_report_from_run_folders(finished_run, small_massive, tmp_path, monkeypatch, capsys):
    from lab import report

    paper = tmp_path / "paper"
    for seed in (0, 1):
        run = paper / f"baseline-s{seed}"
        run.mkdir(parents=True)
        results = read_json(finished_run / "results.json")
        results["seed"] = seed
        (run / "results.json").write_text(json.dumps(results))
    evaluate.main(["--zero-shot", "--model", "all-MiniLM-L6-v2", "--data", str(small_massive),
                   "--out", str(paper / "zeroshot-s0")])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\nend\n")
    report.main([str(paper), "--readme", str(readme)])
    table = (paper / "report.md").read_text()
    accuracy = read_json(finished_run / "results.json")["test"]["accuracy"]
    interval = 1.96 * math.sqrt(accuracy * (1 - accuracy) / 48)  # binomial, on the 48 test sentences
    row = f"| baseline | {accuracy:.4f} ± 0.0000 | ± {interval:.4f} | {accuracy:.4f} {accuracy:.4f} | 0.8762 |"
    assert row in table
    assert "| zeroshot |" in table and "python train.py" in table
    assert (paper / "dev-accuracy.png").exists()
    assert read_json(paper / "report.json")["baseline"]["seeds"] == [0, 1]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "\nold\n" not in text and "| baseline |" in text
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (paper / "dev-accuracy.png").unlink()
    report.main([str(paper)])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert "| baseline |" in (paper / "report.md").read_text()


def test_report_sets_a_variant_beside_the_paper_row_it_varies(finished_run, tmp_path):
    """A recipe the paper has no row for (simclr-swa-cosine) is shown beside the paper's row of
    the recipe it varies (simclr, 0.9152), marked as such; the paper's own rows are not marked."""
    from lab import report

    for name in ("simclr-swa-cosine", "baseline"):
        run = tmp_path / f"{name}-s0"
        run.mkdir()
        results = read_json(finished_run / "results.json")
        results["experiment"] = name
        (run / "results.json").write_text(json.dumps(results))
    report.main([str(tmp_path)])
    table = (tmp_path / "report.md").read_text()
    accuracy = results["test"]["accuracy"]
    assert f"| 0.9152 (simclr)² | {100 * (accuracy - 0.9152):+.2f} pt |" in table
    assert "| 0.8762 | " in table and "| 0.8762 (" not in table
    assert "² The paper has no row for this recipe" in table


def test_report_keeps_each_machines_clock_apart():
    """A row whose seeds ran on two machines reports each one's wall time and rate, not their mean."""
    from lab import report

    def record(seed, device, wall, rate):
        return {"seed": seed, "device": device, "wall_seconds": wall, "samples_per_second": rate,
                "test": {"accuracy": 0.9, "n": 2974, "loss": 0.4, "loss_paper_sum": 74.0},
                "hyperparameters": {"loss": "ce", "epochs": 10}, "trainable_params": 10, "all_params": 20,
                "trainable_pct": 50.0, "model": "m", "command": f"python train.py --seed {seed}"}

    cpu, gpu = "cpu (x86_64, 1 threads)", "cuda (NVIDIA H200)"
    mixed = {"baseline": [record(0, cpu, 1600, 75), record(1, cpu, 1610, 73), record(2, gpu, 285, 413)],
             "scheduler": [record(0, gpu, 290, 400), record(1, gpu, 300, 390)]}
    table = report.markdown(report.summarise(mixed), {})
    assert "| 1605 cpu, 285 cuda | 74 cpu, 413 cuda |" in table
    assert "| 295 | 395 |" in table  # one machine: one figure
    assert "Device: cpu (x86_64, 1 threads), cuda (NVIDIA H200)." in table


def test_report_compares_two_arms_of_one_recipe(tmp_path):
    """--by bucket: each arm's dev and test mean ± std over seeds, the difference of the means with
    its standard error; a run counted once however its folder is named."""
    from lab import report

    for seed, (dev, test) in enumerate([(0.90, 0.89), (0.91, 0.90), (0.92, 0.91)]):
        arm_record(tmp_path / "plain", seed, dev, test, bucket=False)
    for seed, (dev, test) in enumerate([(0.91, 0.91), (0.93, 0.92)]):
        arm_record(tmp_path / "bucketed", seed, dev, test, bucket=True)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- by-bucket:start -->\nold\n<!-- by-bucket:end -->\nend\n")
    out = tmp_path / "cmp" / "bucketing.md"
    folders = [str(tmp_path / "plain"), str(tmp_path / "bucketed"), str(tmp_path / "plain")]
    report.main([*folders, "--by", "bucket", "--out", str(out), "--readme", str(readme)])
    table = out.read_text()
    assert "| baseline | False | 0 1 2 | 0.9100 ± 0.0100 | 0.9000 ± 0.0100 | 0.8900 0.9000 0.9100 |" in table
    assert "| baseline | True | 0 1 | 0.9200 ± 0.0141 | 0.9150 ± 0.0071 | 0.9100 0.9200 |" in table
    # True − False: dev 0.92 − 0.91 ± √(0.0141²/2 + 0.01²/3); test 0.915 − 0.90 ± √(0.0071²/2 + 0.01²/3)
    assert "bucket True − False: dev +1.00 ± 1.15 pt, test +1.50 ± 0.76 pt" in table
    summary = read_json(out.with_suffix(".json"))["baseline"]
    assert summary["True"]["seeds"] == [0, 1] and summary["False"]["test"][0] == pytest.approx(0.90)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "\nold\n" not in text
    assert "--by bucket --out" in text and "| baseline | True |" in text

    arm_record(tmp_path / "single", 0, 0.91, 0.91, bucket=True)
    report.main([str(tmp_path / "plain"), str(tmp_path / "single"), "--by", "bucket", "--out", str(out)])
    table = out.read_text()
    assert "| baseline | True | 0 | 0.9100 (one seed) | 0.9100 (one seed) | 0.9100 |" in table
    assert "bucket True − False: dev +0.00 pt (an arm of one seed), test +1.00 pt (an arm of one seed)" in table
    assert read_json(out.with_suffix(".json"))["baseline"]["True"]["test"] == [0.91, None]

    # Values in their own order, not as strings: 8 before 16, each later one against the first.
    for size, test in ((8, 0.90), (16, 0.92)):
        arm_record(tmp_path / f"batch-{size}", 0, 0.9, test, batch_size=size)
    report.main([str(tmp_path / "batch-16"), str(tmp_path / "batch-8"), "--by", "batch_size", "--out", str(out)])
    assert "batch_size 16 − 8: dev +0.00 pt (an arm of one seed), test +2.00 pt" in out.read_text()


@pytest.mark.parametrize("case, other, match", [
    ("another hyperparameter", {"lr": 5e-5}, r"differ in lr \(0.0001, 5e-05\), not only in bucket"),
    ("another precision", {"precision": "bf16"}, r"differ in precision \('fp32', 'bf16'\)"),
    ("the fast path", {"fast": "cuda graph"}, r"differ in fast \(None, 'cuda graph'\)"),
    ("a seed twice", {"bucket": False}, r"baseline with bucket False: seed 1 twice"),
    ("no dev figure", {"dev": None}, r"other/baseline-s1/results.json: no dev\.accuracy; not a finished run's record"),
])
def test_report_refuses_arms_that_differ_in_more(tmp_path, case, other, match):
    """Two arms that differ in more than the setting, or an arm that holds a run twice, are no
    measure of the setting: one line names the runs and what differs."""
    from lab import report

    for seed in (0, 1):
        arm_record(tmp_path / "plain", seed, bucket=False)
    arm_record(tmp_path / "bucketed", 0, bucket=True)
    arm_record(tmp_path / "other", 1, **{"bucket": True, **other})
    with pytest.raises(SystemExit, match=match):
        report.main([str(tmp_path / name) for name in ("plain", "bucketed", "other")]
                    + ["--by", "bucket", "--out", str(tmp_path / "o.md")])


def test_report_by_a_setting_needs_runs_of_it(tmp_path):
    from lab import report

    arm_record(tmp_path / "plain", 0, bucket=False)
    arm_record(tmp_path / "old", 1)  # a record older than `bucket`: it ran without it
    by = ["--by", "bucket", "--out", str(tmp_path / "o.md")]
    with pytest.raises(SystemExit, match="no experiment ran with more than one value of bucket"):
        report.main([str(tmp_path / "plain"), str(tmp_path / "old"), *by])
    with pytest.raises(SystemExit, match="typo: no \\*/results.json here"):
        report.main([str(tmp_path / "plain"), str(tmp_path / "typo"), *by])
    with pytest.raises(SystemExit, match="--by buckets: not a hyperparameter"):
        report.main([str(tmp_path / "plain"), "--by", "buckets", "--out", str(tmp_path / "o.md")])
    with pytest.raises(SystemExit, match="--by needs --out"):
        report.main([str(tmp_path / "plain"), "--by", "bucket"])


def arm_record(folder, seed, dev=0.9, test=0.9, precision="fp32", fast=None, **hyperparameters):
    """A finished baseline run's results.json, as much of it as a comparison reads."""
    run = folder / f"baseline-s{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "experiment": "baseline", "seed": seed, "precision": precision, "fast": fast,
        "hyperparameters": {"experiment": "baseline", "seed": seed, "epochs": 10, **hyperparameters},
        "dev": dev and {"accuracy": dev, "n": 2033}, "test": {"accuracy": test, "n": 2974}}))


def test_runs_side_by_side_share_the_cores_unless_told(monkeypatch):
    from lab.paper import threads_per_run

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [threads_per_run(jobs, {}) for jobs in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert threads_per_run(2, {"OMP_NUM_THREADS": "1"}) == 1  # the caller's setting wins
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit, match="OMP_NUM_THREADS"):
            threads_per_run(2, {"OMP_NUM_THREADS": bad})


def tiny(data, out, *extra):
    """A run of the tiny reference BERT as stored (dropout 0.1 inside): seconds where the real
    model takes a minute, with every precision path the same."""
    return ["--model", str(REFERENCE / "tiny_odd"), "--max-len", "16", "--data", str(data), "--out", str(out),
            "--log-every", "2", *extra]


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_recorded_dev_is_fp32(run, data):
    """The recorded dev figures are fp32 ones: exactly what an fp32 evaluation of the saved model gives."""
    evaluate.main([str(run), "--split", "dev", "--data", str(data)])
    again, recorded = read_json(run / "eval-dev.json"), read_json(run / "results.json")["dev"]
    assert (again["loss"], again["accuracy"]) == (recorded["loss"], recorded["accuracy"])


# Mixed precision against fp32, on the same batches and dropout masks, where training moves the
# loss far enough for a difference to mean something: 3 epochs at a rate of 1e-2 take the tiny
# model's fp32 train loss from 2.51 to 2.24. Each epoch's train loss is compared. bf16 keeps 8
# bits of mantissa (relative rounding 2^-8 ≈ 0.4 %, 0.01 on these losses per operation), and at
# this rate the rounding of 18 steps moves the trajectory by up to 0.013 (measured); fp16 keeps 11
# bits (measured: 1e-4), and its GradScaler, starting at a scale of 2^16, would skip the steps
# whose gradients overflow while it backs off (none here). The tolerance, 0.05, leaves room for
# other kernels' rounding, while a run whose optimizer never steps stays at 2.86 and misses by
# 0.34 or more, 7 times the tolerance. Dev and test losses are left out: bf16 moves the end point
# of 18 steps at this rate by up to 0.03 on 48 sentences (measured).
MIXED_RECIPE = ["--epochs", "3", "--lr", "1e-2", "--drop-rate", "0.1", "--hidden-dim", "64"]
MIXED_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def fp32_reference(small_massive, tmp_path_factory):
    return train.main(tiny(small_massive, tmp_path_factory.mktemp("fp32") / "run", *MIXED_RECIPE, "--precision", "fp32"))


def check_trains_like_fp32(mixed, full, tolerance):
    ours, reference = [row["train_loss"] for row in history(mixed)], [row["train_loss"] for row in history(full)]
    assert reference[0] - reference[-1] > 0.2, "fp32 must move the loss for the comparison to mean anything"
    for epoch, (a, b) in enumerate(zip(ours, reference, strict=True), start=1):
        assert a == pytest.approx(b, abs=tolerance), f"epoch {epoch}: train loss {a:.4f}, fp32 {b:.4f}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32(precision, fp32_reference, small_massive, tmp_path):
    run = train.main(tiny(small_massive, tmp_path, *MIXED_RECIPE, "--precision", precision))
    results = read_json(run / "results.json")
    assert results["precision"] == precision and results["eval_precision"] == "fp32"
    check_trains_like_fp32(run, fp32_reference, MIXED_TOLERANCE)
    check_recorded_dev_is_fp32(run, small_massive)


def test_gradient_clipping_bounds_every_step(small_massive, minilm_dir, tmp_path, monkeypatch):
    real, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm):
        params = list(params)
        before = real(params, max_norm)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        norms.append((before.item(), after.item()))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.main(args(small_massive, tmp_path, "--epochs", "1", "--max-grad-norm", "0.05"))
    assert len(norms) == 6  # every step of the epoch
    assert all(before > 0.05 for before, _ in norms)  # the bound was binding...
    assert all(after == pytest.approx(0.05, rel=1e-3) for _, after in norms)  # ...and applied


def test_search_never_sees_the_test_split(tmp_path, capsys):
    """Every candidate is `search` with its levers pulled, trained with --no-test; a record that holds
    test figures stops the ranking."""
    from minibert.experiments import PRESETS
    from lab.tune import commands, dev_table, ranking

    plan = commands(tmp_path, "all-MiniLM-L6-v2", 3, 0, "cpu", ["base", "supervise-both+rdrop-4", "swa"],
                    flags=["--precision", "fp32"])
    assert "swa is left out: --swa with --epochs 3" in capsys.readouterr().out
    assert [out.name for out, _ in plan] == ["base-s0", "supervise-both+rdrop-4-s0"]
    for out, argv in plan:
        parsed = train.parse_args(argv[2:])
        assert parsed.no_test and parsed.select == "dev-best" and parsed.experiment == "search"
        assert parsed.precision == "fp32"  # a run setting passed through, not a lever
    config = train.config_from(train.parse_args(plan[1][1][2:]))
    assert config == PRESETS["search"].override(model="all-MiniLM-L6-v2", epochs=3, supervise="both", rdrop=4.0,
                                              select="dev-best", precision="fp32")
    trained = PRESETS["search"].override(epochs=3, select="dev-best").to_dict()
    record = {"seed": 0, "test": None, "dev": {"accuracy": 0.9, "loss": 0.3, "n": 2033}, "dev_best": None,
              "dev_accuracy_per_epoch": [0.9], "wall_seconds": 60, "command": "python train.py",
              "hyperparameters": trained}
    (tmp_path / "base-s0").mkdir()
    (tmp_path / "base-s0" / "results.json").write_text(json.dumps(record))
    assert [r["candidate"] for r in ranking(tmp_path, "search", 3)] == ["base"]
    assert "| base | – | 0.9000 | +0.00 pt |" in dev_table(ranking(tmp_path, "search", 3), 3)
    with pytest.raises(ValueError, match="trained with epochs 3, not the 10"):
        ranking(tmp_path, "search", 10)  # a folder of another search
    (tmp_path / "base-s0" / "results.json").write_text(json.dumps({**record, "test": {"accuracy": 0.9}}))
    with pytest.raises(ValueError, match="evaluated on the test split"):
        ranking(tmp_path, "search", 3)


def test_a_search_refuses_flags_that_change_the_recipe_before_it_trains():
    """Its flags say how the runs run; a recipe flag would fail the ranking after every run."""
    from lab.tune import check_flags

    check_flags(["--precision", "fp32", "--no-fast", "--device", "cpu"], "search")
    check_flags(["--no-bucket"], "lora20")  # lora20's own setting: nothing changes
    for flags in (["--bucket"], ["--lr=1e-3"], ["--epochs", "5"]):
        with pytest.raises(ValueError, match="a setting of the recipe"):
            check_flags(flags, "lora20")


def test_paper_plan_runs_seed_zero_of_every_row_first(tmp_path, capsys):
    from lab.paper import ROWS, commands

    (tmp_path / "baseline-s0").mkdir()
    (tmp_path / "baseline-s0" / "results.json").write_text("{}")  # finished: kept, not run again
    plan = [out.name for out, _ in commands(tmp_path, "all-MiniLM-L6-v2", 10, 2, "cpu")]
    assert plan == [f"{row}-s{seed}" for seed in (0, 1) for row in ROWS if (row, seed) != ("baseline", 0)]
    short = [out.name for out, _ in commands(tmp_path, "all-MiniLM-L6-v2", 4, 1, "cpu")]
    assert "swa-s0" not in short and "both-s0" not in short and "scheduler-s0" in short
    assert "swa is left out: --swa with --epochs 4" in capsys.readouterr().out
    ((out, argv),) = commands(tmp_path, "all-MiniLM-L6-v2", 10, 1, "cpu", ["best"], ["--no-bucket"])
    parsed = train.parse_args(argv[2:])
    assert out.name == "best-s0" and parsed.experiment == "best" and parsed.bucket is False


DEV_CURVE = [0.30, 0.60, 0.40, 0.50]  # a clear best at epoch 2: neither the first nor the last


def run_with_dev_curve(data, out, monkeypatch, *extra):
    """A 4-epoch run whose per-epoch dev accuracies read DEV_CURVE (the evaluation itself is real;
    only the accuracy it reports to the selection is scripted) → (run folder, the weights after
    each epoch)."""
    real_evaluate, real_end = train.evaluate, train.end_of_epoch
    calls, weights = [], []

    def scripted(*a, **k):
        metrics = real_evaluate(*a, **k)
        calls.append(1)
        return {**metrics, "accuracy": DEV_CURVE[len(calls) - 1]} if len(calls) <= len(DEV_CURVE) else metrics

    def end_and_snapshot(run, *a):
        real_end(run, *a)
        weights.append({k: v.clone() for k, v in run.model.state_dict().items()})

    monkeypatch.setattr(train, "evaluate", scripted)
    monkeypatch.setattr(train, "end_of_epoch", end_and_snapshot)
    run = train.main(tiny(data, out, "--epochs", str(len(DEV_CURVE)), "--lr", "1e-3", *extra))
    return run, weights


def check_dev_best_kept_epoch_two(run, weights, data):
    from safetensors.torch import load_file

    results = read_json(run / "results.json")
    assert results["dev_accuracy_per_epoch"] == DEV_CURVE
    assert results["dev_best"]["epoch"] == 2, f"kept epoch {results['dev_best']['epoch']}, the best is 2"
    saved = load_file(run / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in weights[1].items()), "the saved weights are not epoch 2's"
    assert not all(torch.equal(saved[k], v) for k, v in weights[-1].items())  # the curve's epochs differ
    evaluate.main([str(run), "--split", "dev", "--data", str(data)])  # its figures are those weights' own
    assert read_json(run / "eval-dev.json")["loss"] == results["dev_best"]["dev"]["loss"]
    assert not (run / "dev-best.safetensors").exists()


def test_select_dev_best_keeps_that_epoch(small_massive, tmp_path, monkeypatch):
    """--select dev-best keeps the weights of the epoch with the best dev accuracy and records its
    figures apart; `test` stays the last epoch's, as the paper reports."""
    run, weights = run_with_dev_curve(small_massive, tmp_path / "best", monkeypatch, "--select", "dev-best")
    check_dev_best_kept_epoch_two(run, weights, small_massive)


def copy_records(folder, to):
    """The committed results.json of every run in `folder` (relative to the repository), and
    nothing else, to the same place under `to`."""
    for record in (ROOT / folder).glob("*/results.json"):
        (to / folder / record.parent.name).mkdir(parents=True)
        (to / folder / record.parent.name / "results.json").write_bytes(record.read_bytes())


def test_readme_results_are_the_committed_records(tmp_path, monkeypatch):
    """`make readme-results` on the committed records gives the README's results block exactly,
    so no number in it is typed by hand or left behind by a record that changed."""
    from lab import report

    folder = "results/paper/all-MiniLM-L6-v2-e10"
    copy_records(folder, tmp_path)
    (tmp_path / "README.md").write_bytes((ROOT / "README.md").read_bytes())
    monkeypatch.chdir(tmp_path)
    # The picture is matplotlib's to draw; its name in the block is what is compared.
    monkeypatch.setattr(report, "plot_curves", lambda runs, folder: {"dev accuracy per epoch": "dev-accuracy.png"})
    report.main([folder, "--readme", "README.md"])
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text()



@pytest.mark.parametrize("readme, setting", [("lab/README.md", "bucket"), ("README.md", "precision")])
def test_readme_comparison_blocks_are_the_committed_records(readme, setting, tmp_path, monkeypatch):
    """Each generated comparison table is its own generating command, re-run on the records in the repository."""
    from lab import report

    text = (ROOT / readme).read_text()
    block = text.split(f"<!-- by-{setting}:start -->", 1)[1]
    command = shlex.split(block.split("<!-- generated by `", 1)[1].split("` -->", 1)[0])
    assert command[:3] == ["python", "-m", "lab.report"]
    argv = command[3:]
    for folder in argv[:argv.index("--by")]:
        copy_records(folder, tmp_path)
    (tmp_path / readme).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / readme).write_text(text)
    monkeypatch.chdir(tmp_path)
    report.main(argv)
    assert (tmp_path / readme).read_text() == text


def test_best_is_the_committed_searchs_winner():
    """`best` is `search` with the levers of the top row of the committed 10-epoch dev table,
    and that table is what its records rank to (so neither was edited by hand)."""
    from minibert.experiments import BEST_LEVERS, PRESETS
    from lab.tune import changes, dev_table, ranking

    folder = ROOT / "results/tune/all-MiniLM-L6-v2-search-e10"
    rows = ranking(folder, "search", 10)
    assert json.loads((folder / "tune.json").read_text()) == rows
    assert (folder / "dev.md").read_text() == dev_table(rows, 10)
    assert BEST_LEVERS == changes(rows[0]["candidate"])
    assert PRESETS["best"] == PRESETS["search"].override(experiment="best", **changes(rows[0]["candidate"]))


def test_tuned_lora_is_the_committed_lora_screens_winner():
    """lora20-tuned is lora20 with the levers of the top row of the committed LoRA dev screen
    (whose table is what its records rank to); lora30-tuned takes the same levers with alpha = 2r."""
    from minibert.experiments import LORA_LEVERS, PRESETS
    from lab.tune import changes, dev_table, ranking

    folder = ROOT / "results/tune/all-MiniLM-L6-v2-lora20-e3"
    rows = ranking(folder, "lora20", 3)
    assert (folder / "dev.md").read_text() == dev_table(rows, 3)
    assert LORA_LEVERS == changes(rows[0]["candidate"])
    assert PRESETS["lora20-tuned"] == PRESETS["lora20"].override(experiment="lora20-tuned", **LORA_LEVERS)
    alpha = 2 * PRESETS["lora30"].lora_r
    assert PRESETS["lora30-tuned"] == PRESETS["lora30"].override(experiment="lora30-tuned",
                                                                  **{**LORA_LEVERS, "lora_alpha": alpha})
