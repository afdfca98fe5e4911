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


def test_curves_average_the_classifier_epochs_over_seeds(tmp_path, capsys):
    """lab.curves: dev accuracy per classifier epoch, mean ± std over an arm's runs, contrastive
    epochs left out, cut at the fewest epochs any run completed; a glob naming nothing is refused."""
    import json

    from lab import curves

    def run(name, dev):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"epoch": 1, "stage": "contrastive", "train_loss": 0.5},
                *({"epoch": i + 2, "stage": "classifier", "dev_accuracy": a} for i, a in enumerate(dev))]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run("a-s0", [0.5, 0.7, 0.9])
    run("a-s1", [0.7, 0.9])  # stopped an epoch early
    run("b-s0", [0.6, 0.8, 0.8])
    curves.main([f"a={tmp_path}/a-s*", f"b={tmp_path}/b-s*"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| arm | seeds | epoch 1 | epoch 2 |"
    assert lines[2] == "| a | 2 | 0.6000 ± 0.1414 | 0.8000 ± 0.1414 |"
    assert lines[3] == "| b | 1 | 0.6000 ± 0.0000 | 0.8000 ± 0.0000 |"
    with pytest.raises(SystemExit) as e:
        curves.main([f"c={tmp_path}/c-s*"])
    assert e.value.code == 2 and "the glob naming at least one run folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["a={dir}/a-s*", "--epochs", "0"], "--epochs: must be at least 1"),
    (["a={dir}/a-s*", "a={dir}/a-s*"], "the arm 'a' is named twice"),
    (["e={dir}/e-s*"], "no classifier epoch with a dev accuracy"),
])
def test_curves_refuse_what_they_cannot_show(argv, message, tmp_path, capsys):
    from lab import curves

    for name, rows in (("a-s0", '{"stage": "classifier", "dev_accuracy": 0.5}\n'),
                       ("e-s0", '{"stage": "contrastive", "train_loss": 0.5}\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(rows)
    with pytest.raises(SystemExit) as e:
        curves.main([a.format(dir=tmp_path) for a in argv])
    said = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err  # sys.exit(line) or p.error
    assert e.value.code not in (0, None) and message in said


def test_gpu_profile_sorts_kernels_by_kind():
    """lab.gpu's profile: kernel names as the H200's profiler printed them, each to its kind; a
    Triton kernel that fuses a LayerNorm counts as compiled, not as LayerNorm."""
    from lab.gpu import kind_of

    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kind_of("nvjet_sm90_tst_64x40_64x16_2x4_h_bz_bias_TNT") == "matmul"
    assert kind_of("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert kind_of("triton_per_fused_native_layer_norm_backward_3") == "compiled (Triton, fused)"
    assert kind_of("void at::native::vectorized_layer_norm_kernel<float>") == "LayerNorm"
    assert kind_of("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>") == "copies and fills"
    assert kind_of("void at::native::reduce_kernel<128, 4, ReduceOp<c10::BFloat16>>") == "reductions"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "pointwise"
    assert kind_of("something_else") == "other"


def test_speed_profile_accounts_for_every_operator_of_the_step(small_massive, monkeypatch, capsys):
    """lab.speed --profile on the tiny model, 2 steps in each precision: every group is present,
    holds the kernel that defines it and no other group holds that kernel; the groups add up to
    the profiler's own total of the step's self time (key_averages, counted apart from the
    grouping), with no negative time, shares summing to 100 %, and floors for the matrix work and
    the optimizer; the printed table adds up the same way."""
    from functools import partial

    from lab import speed
    from minibert.data import load_massive

    monkeypatch.setattr(speed, "Peaks", partial(speed.Peaks, n=64))  # a small square: a test times no peak
    model = str(REFERENCE / "tiny_odd")
    peaks, profiles = speed.where_time_goes(model, load_massive(small_massive), ["fp32", "bf16"], steps=2, rounds=1,
                                            max_len=16)
    defining = {"matrix work": "aten::mm", "fills and zeroing": "aten::fill_", "copies and casts": "aten::copy_",
                "optimizer": "aten::_fused_adamw_", "dropout": "aten::bernoulli_"}
    for result in profiles.values():
        rows = result.rows(peaks)
        assert [row[0] for row in rows] == [*speed.GROUPS, speed.REST]
        for group, ms, share, floor, _, ops in rows:
            assert ms >= 0 and share >= 0 and all(t >= 0 for t in ops.values()), group
            assert (floor is not None and floor > 0) == (group in ("matrix work", "optimizer")), group
        assert sum(row[1] for row in rows) == pytest.approx(result.total_ms / result.steps, rel=1e-9)
        assert sum(row[2] for row in rows) == pytest.approx(100)
        for group, kernel in defining.items():
            holders = [row[0] for row in rows if kernel in row[5]]
            assert holders == [group], f"{result.precision}: {kernel} counted in {holders}"

    speed.print_profile(model, peaks, profiles, max_len=16)
    tables = capsys.readouterr().out.split("\n\n")[1:]
    assert [table.split(":", 1)[0] for table in tables] == ["fp32", "bf16"]
    for table in tables:
        total = float(table.split("operators' self CPU ", 1)[1].split(" ms/step", 1)[0])
        lines = table.strip().splitlines()[2:]
        assert [line[2:22].strip() for line in lines] == [*speed.GROUPS, speed.REST]
        printed = [line[22:].split() for line in lines]  # ms/step, share, %, floor, ...
        assert sum(float(p[0]) for p in printed) == pytest.approx(total, abs=0.05 * len(lines) + 0.05)
        assert sum(float(p[1]) for p in printed) == pytest.approx(100, abs=0.05 * len(lines))


def test_speed_compares_every_system_round_by_round(small_massive, transformers, monkeypatch, capsys):
    """lab.speed's side-by-side on the tiny model, fp32, 2 rounds of 1 step: a row for each system,
    each with a ratio to transformers that is its median over the rounds, inside its printed
    spread (transformers' own: 1.00x exactly), and the kept word gradient's own gain."""
    from argparse import Namespace
    from functools import partial

    from lab import speed
    from minibert.data import load_massive

    monkeypatch.setattr(speed, "Peaks", partial(speed.Peaks, n=64))
    args = Namespace(model=str(REFERENCE / "tiny_odd"), precision=["fp32"])
    speed.compare(args, load_massive(small_massive), steps=1, rounds=2)
    out = capsys.readouterr().out
    rows = {line[2:44].strip(): line[44:] for line in out.splitlines() if line.startswith("  ") and " ms/step " in line}
    assert list(rows) == ["transformers, fp32", "minibert, fp32", "minibert, dense word gradient, fp32",
                          "transformers, grouped by length, fp32", "minibert, bucketed, fp32"]
    for name, row in rows.items():
        ratio, spread = row.split("x [", 1)
        low, high = (float(x) for x in spread.split("]", 1)[0].split("-"))
        assert low <= float(ratio.split()[-1]) <= high, name
    assert "1.00x [1.00-1.00]" in rows["transformers, fp32"]
    assert "the kept word gradient's own gain, fp32: " in out
