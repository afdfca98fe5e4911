"""Choose the `best` preset on the dev split alone.

    python -m lab.tune results/tune/all-MiniLM-L6-v2-search-e3 --model all-MiniLM-L6-v2 --epochs 3 --jobs 2
    python -m lab.tune results/tune/all-MiniLM-L6-v2-search-e10 --epochs 10 \
        --candidates base swa supervise-both+swa
    python -m lab.tune results/tune/lora20-e3 --base lora20 --candidates base lora-alpha-40 lr-1e-3

A candidate is the `search` preset (or --base PRESET) with levers pulled: one lever (the screen),
or several joined by "+". Each trains with `train.py --no-test`, so the test split is never
evaluated (each results.json is checked for it), and keeps its best dev epoch apart
(--select dev-best) unless it averages weights. The ranking, by the last epoch's dev accuracy,
goes to dev.md and tune.json beside the run folders. A finished run is kept, an interrupted one
resumes, as with `make paper`; the records (results.json, metrics.jsonl) are meant to be committed.
"""

import json
import shlex
import sys
from pathlib import Path

from minibert.cli import Parser
from minibert.evaluation import accuracy_interval
from minibert.experiments import MAX_EPOCHS, MAX_SEED, PRESETS, add_config_flags, as_recorded, config_from, flag
from minibert.fetch import DownloadError
from minibert.runs import begins_with, check_out, read_results, require
from lab.paper import MAX_RUNS, run_all
from minibert.weights import resolve

# Each lever: the TrainConfig fields it changes from the base preset (`search`: drop 0.1 on [CLS],
# head 256, linear schedule with 6% warmup, lr 1e-4, bucketed batches). "base" changes nothing.
LEVERS = {
    "base": {},
    "supervise-intents": {"supervise": "intents"},  # 60 intents; a scenario is the sum of its intents
    "supervise-both": {"supervise": "both"},
    "layer-decay-0.8": {"layer_decay": 0.8},
    "lr-2e-4": {"lr": 2e-4},
    "lr-5e-5": {"lr": 5e-5},
    "rdrop-4": {"rdrop": 4.0},  # per sentence: the R-Drop code's alpha 0.25 at batch 16
    "supcon-intents": {"loss": "supcon", "contrastive_labels": "intents", "contrastive_epochs": 1},
    "swa": {"swa": True},
    # For --base lora20 / lora30: peft's examples scale alpha with r and train at higher rates.
    "lora-alpha-40": {"lora_alpha": 40.0},
    "lora-alpha-60": {"lora_alpha": 60.0},
    "lr-5e-4": {"lr": 5e-4},
    "lr-1e-3": {"lr": 1e-3},
    "head-best": {"drop_rate": 0.1, "hidden_dim": 256},  # the paper's presets with `best`'s head
    "pool-mean": {"pooling": "mean"},  # the head reads the mean of the word-pieces, not [CLS]
    "max-len-64": {"max_len": 64},  # no sentence cut: --max-len 20 cuts 1.2 % of the train sentences
    "batch-32": {"batch_size": 32},
}
SCREEN = ["base", "supervise-intents", "supervise-both", "layer-decay-0.8", "lr-2e-4", "lr-5e-5", "rdrop-4",
          "supcon-intents", "swa"]  # each lever alone on `search`: the default candidates


def changes(candidate):
    """"supervise-both+swa" → {"supervise": "both", "swa": True}."""
    merged = {}
    for lever in candidate.split("+"):
        if lever not in LEVERS:
            raise ValueError(f"--candidates {candidate}: no lever {lever!r}; the levers are {', '.join(LEVERS)}")
        merged.update(LEVERS[lever])
    return merged


def config_of(candidate, base, epochs):
    """The candidate's TrainConfig: the base preset with its levers pulled, keeping its best dev
    epoch apart unless it averages weights."""
    fields = changes(candidate)
    if not fields.get("swa"):
        fields["select"] = "dev-best"
    return PRESETS[base].override(epochs=epochs, **fields), fields


def argv_of(fields):
    """TrainConfig fields → train.py flags."""
    argv = []
    for name, value in fields.items():
        argv += [flag(name)] if value is True else [flag(name), str(value)]
    return argv


def commands(folder, model, epochs, seed, device, candidates, base="search", flags=()):
    """→ [(run folder, argv)] of the candidates not finished yet; a candidate whose settings cannot
    work at this length (SWA needs 5 epochs or more) is left out, said once. `flags` go to every
    run: settings of the run, not of the recipe (--precision, --fast)."""
    todo = []
    for candidate in candidates:
        try:
            config, fields = config_of(candidate, base, epochs)
            config.check()
        except ValueError as e:
            print(f"{candidate} is left out: {e}")
            continue
        out = Path(folder) / f"{candidate}-s{seed}"
        if not (out / "results.json").exists():
            todo.append((out, [sys.executable, "train.py", "--experiment", base, "--model", model, "--epochs",
                               str(epochs), "--seed", str(seed), "--device", device, "--out", str(out), "--resume",
                               "--no-test", *argv_of(fields), *flags]))
    return todo


def check_flags(flags, base):
    """--flags carries settings of the run (--precision, --fast, --device), never of the recipe: a
    candidate is its levers on the base preset, and the ranking holds each record to that."""
    parser = Parser(prog="python -m lab.tune --flags", add_help=False)
    add_config_flags(parser)
    given, _ = parser.parse_known_args(["--experiment", base, *flags])
    recipe, preset = config_from(given).to_dict(), PRESETS[base].to_dict()
    changed = [k for k in recipe if k != "precision" and recipe[k] != preset[k]]
    if changed:
        raise ValueError(f"--flags {shlex.join(flags)}: sets {flag(changed[0])}, a setting of the recipe; a search "
                         "changes the recipe through its candidates' levers (--candidates), its flags only how the "
                         "runs run (--precision, --fast)")


# What the ranking reads of each candidate's results.json (and, with --select dev-best, of its kept epoch).
RANKED = ("seed", "hyperparameters", "dev.accuracy", "dev.loss", "dev.n", "dev_accuracy_per_epoch", "wall_seconds",
          "command")
KEPT = ("dev_best.epoch", "dev_best.dev.accuracy")


def ranking(folder, base, epochs):
    """The finished candidates of `folder`, best dev accuracy first. A record that saw the test
    split, or was trained with other settings than its name says, stops the ranking."""
    rows = []
    for path in sorted(Path(folder).glob("*/results.json")):
        results = read_results(path, RANKED)
        if results.get("dev_best"):
            require(results, KEPT, path)
        if results.get("test") is not None or (results.get("dev_best") or {}).get("test") is not None:
            raise ValueError(f"{path}: evaluated on the test split; a search must not see it")
        candidate = path.parent.name.rsplit("-s", 1)[0]
        expected = config_of(candidate, base, epochs)[0].to_dict()
        trained = as_recorded(results["hyperparameters"])
        # The experiment is a name, not a setting: the committed search ran `search`'s settings
        # when that preset was still called best.
        # The precision is how a candidate ran (--flags), not one of its levers.
        differ = [k for k in expected if k not in ("experiment", "model", "seed", "precision")
                  and trained[k] != expected[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{path}: trained with {k} {trained.get(k)!r}, not the {expected[k]!r} of {candidate} "
                             f"on {base} at {epochs} epochs; give this search its own folder")
        rows.append({"candidate": candidate, "seed": results["seed"], "changes": changes(candidate),
                     "dev_accuracy": results["dev"]["accuracy"], "dev_loss": results["dev"]["loss"],
                     "dev_n": results["dev"]["n"],
                     "dev_best": results.get("dev_best") and {"epoch": results["dev_best"]["epoch"],
                                                              "accuracy": results["dev_best"]["dev"]["accuracy"]},
                     "dev_accuracy_per_epoch": results["dev_accuracy_per_epoch"],
                     "wall_seconds": results["wall_seconds"], "command": results["command"]})
    return sorted(rows, key=lambda r: -r["dev_accuracy"])


TITLE = "Dev accuracy after"  # how dev.md begins


def check_table(folder):
    """The search rewrites its own dev.md (it begins with the table's title), and tune.json beside
    it; never a file of those names it did not write."""
    ours = begins_with(Path(folder, "dev.md"), TITLE)
    for name in ("dev.md", "tune.json"):
        check_out(Path(folder, name), "move it, or search into another folder", own=lambda _: ours, folder=False)


def dev_table(rows, epochs):
    base = next((r["dev_accuracy"] for r in rows if r["candidate"] == "base"), None)
    lines = [f"{TITLE} {epochs} epochs (the test split was never evaluated), best first.",
             "", "| candidate | changes from the base preset | dev accuracy | Δ vs base | dev loss | best dev epoch: "
             "accuracy | dev accuracy per epoch | minutes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(flag(k) if v is True else f"{flag(k)} {v}" for k, v in r["changes"].items()) or "–"
        delta = f"{100 * (r['dev_accuracy'] - base):+.2f} pt" if base is not None else "–"
        best = f"{r['dev_best']['epoch']}: {r['dev_best']['accuracy']:.4f}" if r["dev_best"] else "–"
        curve = " ".join(f"{a:.3f}" for a in r["dev_accuracy_per_epoch"])
        lines.append(f"| {r['candidate']} | {changed} | {r['dev_accuracy']:.4f} | {delta} | {r['dev_loss']:.4f} | "
                     f"{best} | {curve} | {r['wall_seconds'] / 60:.0f} |")
    if rows:
        se, _ = accuracy_interval(rows[0]["dev_accuracy"], rows[0]["dev_n"])
        lines += ["", f"One seed each: the dev split's binomial 95 % interval is ± {100 * 1.96 * se:.2f} points "
                  f"({rows[0]['dev_n']} sentences); a difference inside it is a hint, not evidence."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = Parser(prog="python -m lab.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where the run folders, dev.md and tune.json go")
    p.add_argument("--model", default="auto")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1: one run uses every core)")
    p.add_argument("--base", choices=sorted(PRESETS), default="search", help="the preset the levers change")
    p.add_argument("--candidates", nargs="+", default=SCREEN,
                   help=f"levers, or levers joined by + (default: {' '.join(SCREEN)})")
    p.add_argument("--flags", default="", help="more train.py flags for every run, e.g. --flags='--precision fp32'")
    args = p.parse_args(argv)
    if not (1 <= args.jobs <= MAX_RUNS and 1 <= args.epochs <= MAX_EPOCHS):
        p.error(f"--jobs must be from 1 to {MAX_RUNS}, and --epochs from 1 to {MAX_EPOCHS}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed}: must be a whole number from 0 to {MAX_SEED}")
    try:
        check_flags(shlex.split(args.flags), args.base)
        check_table(args.folder)  # before the first run: the table is written after the last
        model, _ = resolve(args.model)  # decided once, so that every candidate trains the same model
        todo = commands(args.folder, model, args.epochs, args.seed, args.device, args.candidates, args.base,
                        shlex.split(args.flags))
        failed = run_all(todo, args.jobs)
        rows = ranking(args.folder, args.base, args.epochs)
    except (ValueError, DownloadError) as e:
        sys.exit(f"python -m lab.tune: {e}")
    folder = Path(args.folder)
    (folder / "tune.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "dev.md").write_text(dev_table(rows, args.epochs))
    print(dev_table(rows, args.epochs) + f"wrote {folder / 'dev.md'} and {folder / 'tune.json'}")
    if failed:
        sys.exit(f"python -m lab.tune: {failed} of {len(todo)} runs failed; see their train.log")


if __name__ == "__main__":
    main()
