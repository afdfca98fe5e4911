"""Tables and figures of the paper, regenerated from run folders, with the variance over seeds.

    python -m minibert.report runs/paper/all-MiniLM-L6-v2-e10 [--readme README.md]

Reads every `*/results.json` below the folder, groups runs by experiment, and writes
`report.md`, `report.json` and one accuracy-per-epoch figure per experiment (matplotlib is
optional: without it the tables are still written). With --readme, the README's results
section (between its two markers) is replaced by the report's tables.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

# The paper's Tables 4-7: (summed test loss, test accuracy), bert-base-uncased, single runs.
PAPER = {
    "zeroshot": (368.2746, 0.0300),
    "baseline": (138.4782, 0.8762),
    "scheduler": (102.4884, 0.9092),
    "swa": (126.2647, 0.8698),
    "both": (138.1905, 0.8755),
    "lora20": (89.3785, 0.8903),
    "lora30": (85.1104, 0.8907),
    "supcon": (347.9449, 0.8967),
    "simclr": (302.1467, 0.9152),
}
ORDER = list(PAPER) + ["best"]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(folder):
    runs = {}
    for path in sorted(Path(folder).glob("*/results.json")):
        result = json.loads(path.read_text())
        result["run_dir"] = str(path.parent)
        runs.setdefault(result["experiment"], []).append(result)
    return {name: sorted(runs[name], key=lambda r: r["seed"]) for name in ORDER if name in runs}


def summarise(runs):
    rows = {}
    for name, results in runs.items():
        acc = [r["test"]["accuracy"] for r in results]
        row = {
            "seeds": [r["seed"] for r in results],
            "accuracy": mean_std(acc),
            "accuracy_per_seed": acc,
            "loss_paper_sum": mean_std([r["test"]["loss_paper_sum"] for r in results]),
            "loss_mean": mean_std([r["test"]["loss"] for r in results]),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in results),
            "samples_per_second": statistics.fmean(r["samples_per_second"] or 0 for r in results)
            if all(r.get("samples_per_second") for r in results) else None,
            "trainable_params": results[0].get("trainable_params"),
            "all_params": results[0].get("all_params"),
            "trainable_pct": results[0].get("trainable_pct"),
            "epochs": results[0]["hyperparameters"]["epochs"],
            "model": results[0]["model"],
            "device": results[0]["device"],
            "commands": [r["command"] for r in results],
        }
        if name in PAPER:
            row["paper_loss_sum"], row["paper_accuracy"] = PAPER[name]
            row["accuracy_vs_paper"] = row["accuracy"][0] - PAPER[name][1]
        rows[name] = row
    return rows


def markdown(rows, figures):
    models = sorted({r["model"] for r in rows.values()})
    devices = sorted({r["device"] for r in rows.values()})
    epochs = sorted({r["epochs"] for r in rows.values() if r["epochs"]})
    lines = [
        f"Model: {', '.join(models)}. Device: {', '.join(devices)}. Classifier epochs: "
        f"{', '.join(map(str, epochs))} (the paper: 10). The paper's numbers are bert-base-uncased, single runs.",
        "",
        "| experiment | test accuracy (mean ± std) | per seed | paper | Δ vs paper | test loss, paper's sum "
        "(mean ± std) | paper | per-example loss | trainable / all params | trainable % | wall s/run | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        acc, loss = r["accuracy"], r["loss_paper_sum"]
        paper_acc = f"{r['paper_accuracy']:.4f}" if "paper_accuracy" in r else "–"
        delta = f"{100 * r['accuracy_vs_paper']:+.2f} pt" if "accuracy_vs_paper" in r else "–"
        paper_loss = f"{r['paper_loss_sum']:.2f}" if "paper_loss_sum" in r else "–"
        params = (f"{r['trainable_params']:,} / {r['all_params']:,}" if r["trainable_params"] else "–")
        pct = f"{r['trainable_pct']:.4f}" if r["trainable_pct"] is not None else "–"
        rate = f"{r['samples_per_second']:.0f}" if r["samples_per_second"] else "–"
        lines.append(
            f"| {name} | {acc[0]:.4f} ± {acc[1]:.4f} | {' '.join(f'{a:.4f}' for a in r['accuracy_per_seed'])} "
            f"| {paper_acc} | {delta} | {loss[0]:.2f} ± {loss[1]:.2f} | {paper_loss} | {r['loss_mean'][0]:.4f} "
            f"| {params} | {pct} | {r['wall_seconds']:.0f} | {rate} |")
    lines += ["", "Re-run any row with its exact command (remove its run folder first: a finished run is reused):", ""]
    for name, r in rows.items():
        lines += [f"- {name}: `{r['commands'][0]}`"]
    if figures:
        lines += ["", "Train and dev accuracy per epoch (seeds thin, mean bold):", ""]
        lines += [f"![{name}]({path})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def plot_curves(runs, folder):
    """One figure per experiment, like the paper's Figures 1-4; {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): tables only, no figures")
        return {}
    figures = {}
    for name, results in runs.items():
        curves = {"train": [r.get("train_accuracy_per_epoch") or [] for r in results],
                  "dev": [r["dev_accuracy_per_epoch"] for r in results]}
        if not any(curves["dev"]):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for split, color in (("train", "tab:blue"), ("dev", "tab:orange")):
            per_seed = [c for c in curves[split] if c]
            for c in per_seed:
                ax.plot(range(1, len(c) + 1), c, color=color, linewidth=0.7, alpha=0.5)
            if per_seed:
                n = min(map(len, per_seed))
                mean = [statistics.fmean(c[i] for c in per_seed) for i in range(n)]
                ax.plot(range(1, n + 1), mean, color=color, linewidth=2.5, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        path = f"accuracy-{name}.png"
        fig.savefig(Path(folder) / path, dpi=110)
        plt.close(fig)
        figures[name] = path
    return figures


def update_readme(readme, folder, table):
    text = Path(readme).read_text()
    if README_START not in text or README_END not in text:
        sys.exit(f"{readme}: no {README_START} … {README_END} markers to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    # Run folders are not committed: the README names the figures instead of embedding them.
    lines = [line for line in table.splitlines() if not line.startswith("![")]
    table = "\n".join(line if not line.startswith("Train and dev accuracy per epoch") else
                      f"Figures of train and dev accuracy per epoch: `{folder}/accuracy-*.png`."
                      for line in lines) + "\n"
    body = f"{README_START}\n<!-- generated by `python -m minibert.report {folder} --readme {readme}` -->\n\n{table}\n"
    Path(readme).write_text(head + body + README_END + tail)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a folder of run folders")
    p.add_argument("--readme", help="also replace this README's results section")
    args = p.parse_args(argv)
    runs = collect(args.folder)
    if not runs:
        sys.exit(f"{args.folder}: no */results.json here; run `make paper` first")
    rows = summarise(runs)
    figures = plot_curves(runs, args.folder)
    table = markdown(rows, figures)
    Path(args.folder, "report.md").write_text("# minibert: the paper's experiments\n\n" + table)
    Path(args.folder, "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"wrote {Path(args.folder, 'report.md')} and report.json")
    if args.readme:
        update_readme(args.readme, args.folder, table)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
