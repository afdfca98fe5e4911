"""Tables and figures of the paper, regenerated from run folders, with the variance over seeds.

    python -m lab.report runs/paper/all-MiniLM-L6-v2-e10 [--readme README.md]
    python -m lab.report FOLDER... --by bucket --out runs/bucketing.md [--readme README.md]

Reads every `*/results.json` below the folder, groups runs by experiment, and writes
`report.md`, `report.json` and one accuracy-per-epoch figure per experiment (matplotlib is
optional: without it the tables are still written). With --readme, the README's results
section (between its two markers) is replaced by the report's tables.

With --by SETTING the runs of every folder are grouped by experiment and by that hyperparameter's
value instead: dev and test accuracy of each arm, and the difference between the arms, for the
experiments that ran both ways (and differ in nothing else). --readme then replaces the section
between `<!-- by-SETTING:start -->` and `<!-- by-SETTING:end -->`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from minibert.evaluation import accuracy_interval
from minibert.experiments import FIELDS, PRESETS, as_recorded
from minibert.runs import begins_with, check_out, read_results, require

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
# Recipes the paper has no row for, shown beside the paper's row of the recipe they vary: its
# first author gives 91.5 % for SimCLR "with SWA and cosine decay" (their portfolio page).
VARIANT_OF = {"simclr-swa-cosine": "simclr", "supcon-swa-cosine": "supcon"}
ORDER = ["zeroshot", *PRESETS]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
TITLE, COMPARED = "# minibert: the paper's experiments", "# minibert: runs compared by"  # how its pages begin
ONE_RUN = ("seed",)  # what may differ between the runs of one arm
# What the table reads of every run's results.json, and the comparison of arms of each run compared.
TABLE_NEEDS = ("experiment", "seed", "model", "device", "command", "hyperparameters.epochs", "test.accuracy",
               "test.loss", "test.loss_paper_sum", "test.n", "wall_seconds", "dev_accuracy_per_epoch")
COMPARED_NEEDS = ("hyperparameters", "dev.accuracy", "test.accuracy", "test.n", "precision")
RUN_SETTINGS = ("precision", "fast")  # how a run ran, recorded beside its hyperparameters


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(folder, need=("experiment", "seed")):
    """{experiment: its runs' results.json records, by seed}, each with the fields of `need`."""
    runs = {}
    for path in sorted(Path(folder).glob("*/results.json")):
        try:
            result = read_results(path, need)
        except ValueError as e:
            sys.exit(str(e))
        result["run_dir"] = str(path.parent)
        runs.setdefault(result["experiment"], []).append(result)
    return {name: sorted(runs[name], key=lambda r: r["seed"]) for name in ORDER if name in runs}


def paper_loss(result):
    """The test loss the paper's table holds for this row, summed over batches as the paper sums
    it: cross-entropy, or for a contrastive row (SupCon, SimCLR) its stage-1 contrastive loss
    ("a higher loss ... is expected since these methods use contrastive loss"). None where a
    contrastive run predates that record."""
    if result["hyperparameters"].get("loss", "ce") == "ce":
        return result["test"]["loss_paper_sum"]
    return (result.get("contrastive") or {}).get("test_contrastive_loss_paper_sum")


def clocks_by_device(results):
    """{device: its runs' mean wall seconds and samples/s}: seeds that ran on different machines
    have no one clock figure between them."""
    clocks = {}
    for device in sorted({r["device"] for r in results}):
        ran = [r for r in results if r["device"] == device]
        rates = [r.get("samples_per_second") for r in ran]
        clocks[device] = {"wall_seconds": statistics.fmean(r["wall_seconds"] for r in ran),
                          "samples_per_second": statistics.fmean(rates) if all(rates) else None}
    return clocks


def summarise(runs):
    rows = {}
    for name, results in runs.items():
        acc = [r["test"]["accuracy"] for r in results]
        row = {
            "seeds": [r["seed"] for r in results],
            "accuracy": mean_std(acc),
            "accuracy_per_seed": acc,
            "loss_paper_sum": mean_std([paper_loss(r) for r in results])
            if all(paper_loss(r) is not None for r in results) else None,
            "loss_kind": "contrastive" if results[0]["hyperparameters"].get("loss", "ce") != "ce" else "cross-entropy",
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
            "by_device": clocks_by_device(results),
            "commands": [r["command"] for r in results],
        }
        n = results[0]["test"]["n"]
        se, _ = accuracy_interval(row["accuracy"][0], n)
        row["binomial_95"] = 1.96 * se
        paper = name if name in PAPER else VARIANT_OF.get(name)
        if paper:
            row["paper_loss_sum"], row["paper_accuracy"] = PAPER[paper]
            row["accuracy_vs_paper"] = row["accuracy"][0] - PAPER[paper][1]
            if paper != name:
                row["paper_row"] = paper
        rows[name] = row
    return rows


def markdown(rows, figures):
    models = sorted({r["model"] for r in rows.values()})
    devices = sorted({device for r in rows.values() for device in r["by_device"]})
    epochs = sorted({r["epochs"] for r in rows.values() if r["epochs"]})
    lines = [
        f"Model: {', '.join(models)}. Device: {', '.join(devices)}. Classifier epochs: "
        f"{', '.join(map(str, epochs))} (the paper: 10). The paper's numbers are bert-base-uncased, single runs.",
        "",
        "| experiment | test accuracy (mean ± std) | binomial 95 % | per seed | paper | Δ vs paper "
        "| test loss, paper's sum (mean ± std)¹ | paper | per-example CE loss | trainable / all params "
        "| trainable % | wall s/run | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        acc, loss = r["accuracy"], r["loss_paper_sum"]
        summed = "–" if loss is None else f"{loss[0]:.2f} ± {loss[1]:.2f}"
        summed += " (contr.)" if r["loss_kind"] == "contrastive" and loss else ""
        paper_acc = f"{r['paper_accuracy']:.4f}" if "paper_accuracy" in r else "–"
        paper_acc += f" ({r['paper_row']})²" if "paper_row" in r else ""
        delta = f"{100 * r['accuracy_vs_paper']:+.2f} pt" if "accuracy_vs_paper" in r else "–"
        paper_loss = f"{r['paper_loss_sum']:.2f}" if "paper_loss_sum" in r else "–"
        params = (f"{r['trainable_params']:,} / {r['all_params']:,}" if r["trainable_params"] else "–")
        pct = f"{r['trainable_pct']:.4f}" if r["trainable_pct"] is not None else "–"
        rate = f"{r['samples_per_second']:.0f}" if r["samples_per_second"] else "–"
        wall = f"{r['wall_seconds']:.0f}"
        if len(r["by_device"]) > 1:  # each machine's own figures, named by its kind
            wall, rate = (", ".join(f"{figures[key]:.0f} {device.split()[0]}" if figures[key] else "–"
                                    for device, figures in r["by_device"].items())
                          for key in ("wall_seconds", "samples_per_second"))
        lines.append(
            f"| {name} | {acc[0]:.4f} ± {acc[1]:.4f} | ± {r['binomial_95']:.4f} "
            f"| {' '.join(f'{a:.4f}' for a in r['accuracy_per_seed'])} "
            f"| {paper_acc} | {delta} | {summed} | {paper_loss} | {r['loss_mean'][0]:.4f} "
            f"| {params} | {pct} | {wall} | {rate} |")
    lines += ["", "¹ The sum of the test batches' mean loss (batches of 16), as the paper reports it: cross-entropy; "
              "for SupCon and SimCLR, like the paper, the stage-1 contrastive loss of the encoder with its "
              "projection head on two dropout views (marked contr.)."]
    if any("paper_row" in r for r in rows.values()):
        lines += ["", "² The paper has no row for this recipe: the row shown is the one of the paper's recipes it "
                  "varies."]
    lines += ["", "Re-run any row with its exact command (remove its run folder first: a finished run is reused):", ""]
    for name, r in rows.items():
        lines += [f"- {name}: `{r['commands'][0]}`"]
    lines += ["", "Binomial 95 %: ± 1.96 √(p(1 - p) / n) on the test set's n sentences at the mean accuracy p, "
              "the spread one run's accuracy has from the test sample alone; differences inside it are not "
              "evidence."]
    if figures:
        lines += ["", "Dev accuracy per epoch (seeds thin, mean bold, band ± one std over seeds):", ""]
        lines += [f"![{name}]({path})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def plot_curves(runs, folder):
    """Dev accuracy per epoch, one panel per experiment: each seed thin, the mean bold, a band of
    ± one std over seeds. Returns {title: file}, {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): tables only, no figures")
        return {}
    curves = {name: [r["dev_accuracy_per_epoch"] for r in results if r["dev_accuracy_per_epoch"]]
              for name, results in runs.items()}
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return {}
    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False, sharey=True)
    for ax, (name, per_seed) in zip(axes.flat, curves.items()):
        n = min(map(len, per_seed))
        epochs = range(1, n + 1)
        for c in per_seed:
            ax.plot(range(1, len(c) + 1), c, color="tab:orange", linewidth=0.7, alpha=0.5)
        mean_and_std = [mean_std([c[i] for c in per_seed]) for i in range(n)]
        mean = [m for m, _ in mean_and_std]
        ax.fill_between(epochs, [m - s for m, s in mean_and_std], [m + s for m, s in mean_and_std],
                        color="tab:orange", alpha=0.25, linewidth=0)
        ax.plot(epochs, mean, color="tab:orange", linewidth=2.2)
        ax.set_title(f"{name} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("dev accuracy")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = "dev-accuracy.png"
    fig.savefig(Path(folder) / path, dpi=100)
    plt.close(fig)
    return {"dev accuracy per epoch": path}


def check_report(folder):
    """The report rewrites its own report.md (it begins with the report's title), and report.json and
    the figure beside it; never a file of those names it did not write."""
    ours = begins_with(Path(folder, "report.md"), TITLE)
    for name in ("report.md", "report.json", "dev-accuracy.png"):
        check_out(Path(folder, name), "move it, or report into another folder", own=lambda _: ours, folder=False)


def update_readme(readme, folder, table, command=None, markers=(README_START, README_END)):
    start, end = markers
    try:
        text = Path(readme).read_text(encoding="utf-8")
    except OSError as e:
        sys.exit(f"{readme}: cannot read ({e.strerror}); pass --readme the README whose section to replace")
    except UnicodeDecodeError as e:
        sys.exit(f"{readme}: not UTF-8 text (byte {e.start + 1}); pass --readme the README whose section to replace")
    if start not in text or end not in text:
        sys.exit(f"{readme}: no {start} … {end} markers to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    # The figures sit beside the records (committed with them): the README links them there.
    table = table.replace("](", f"]({Path(folder).as_posix()}/")
    command = command or f"python -m lab.report {folder} --readme {readme}"
    body = f"{start}\n<!-- generated by `{command}` -->\n\n{table}\n"
    Path(readme).write_text(head + body + end + tail)


def arms(folders, setting):
    """{experiment: {value of `setting`: [results by seed]}} over every folder's runs, values in
    order, for the experiments that ran with more than one value. Exits where two runs differ in
    anything but the setting and the seed (another hyperparameter, the precision, the fast path,
    which pads every batch to full length): their difference would not be the setting's."""
    if setting not in FIELDS and setting not in RUN_SETTINGS:
        sys.exit(f"--by {setting}: not a hyperparameter or run setting; one of {', '.join([*FIELDS, *RUN_SETTINGS])}")
    grouped, seen = {}, set()
    for folder in folders:
        runs = collect(folder)
        if not runs:
            sys.exit(f"{folder}: no */results.json here")
        for r in (r for results in runs.values() for r in results):
            if Path(r["run_dir"]).resolve() in seen:  # a folder named twice
                continue
            seen.add(Path(r["run_dir"]).resolve())
            r["recipe"] = {**as_recorded(r.get("hyperparameters") or {}), "precision": r.get("precision"),
                           "fast": r.get("fast")}
            grouped.setdefault(r["experiment"], {}).setdefault(r["recipe"][setting], []).append(r)
    compared = {}
    for name, by_value in grouped.items():
        if len(by_value) < 2:
            continue
        runs = [r for results in by_value.values() for r in results]
        for r in runs:
            try:
                require(r, COMPARED_NEEDS, f"{r['run_dir']}/results.json")
            except ValueError as e:
                sys.exit(str(e))
        for key in runs[0]["recipe"].keys() - {setting, *ONE_RUN}:
            other = next((r for r in runs if r["recipe"][key] != runs[0]["recipe"][key]), None)
            if other:
                sys.exit(f"{runs[0]['run_dir']} and {other['run_dir']} differ in {key} "
                         f"({runs[0]['recipe'][key]!r}, {other['recipe'][key]!r}), not only in {setting}: "
                         "compare runs of one recipe")
        for value, results in by_value.items():
            seeds = [r["seed"] for r in results]
            twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
            if twice:
                sys.exit(f"{name} with {setting} {value}: seed {twice[0]} twice "
                         f"({', '.join(r['run_dir'] for r in results if r['seed'] == twice[0])}); give each run once")
        values = sorted(by_value, key=lambda value: (value is not None, value))  # fast: None (off), or its steps
        compared[name] = {value: sorted(by_value[value], key=lambda r: r["seed"]) for value in values}
    return compared


def difference(a, b):
    """Mean of a minus mean of b, and its standard error √(s_a²/n_a + s_b²/n_b) (independent
    runs: a seed's two arms see different batches, so they are not pairs); None for the error
    where an arm has one run and so no spread."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5 if min(len(a), len(b)) > 1 else None
    return ma - mb, se


def spread(values):
    """'mean ± std', or the value alone where one run gives no spread."""
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f} (one seed)"


def arm_summary(results):
    """One arm's accuracies as [mean, std] (std None for one seed), its seeds and run folders."""
    summary = {}
    for split in ("dev", "test"):
        values = [r[split]["accuracy"] for r in results]
        summary[split] = [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None]
    return summary | {"seeds": [r["seed"] for r in results], "run_dirs": [r["run_dir"] for r in results]}


def compare_markdown(compared, setting):
    lines = [f"| experiment | {setting} | seeds | dev accuracy (mean ± std) | test accuracy (mean ± std) "
             f"| test per seed | run folders |", "|---|---|---|---|---|---|---|"]
    deltas = []
    for name, by_value in compared.items():
        for value, results in by_value.items():
            dev, test = ([r[split]["accuracy"] for r in results] for split in ("dev", "test"))
            folders = sorted({str(Path(r["run_dir"]).parent.as_posix()) for r in results})
            lines.append(f"| {name} | {value} | {' '.join(str(r['seed']) for r in results)} "
                         f"| {spread(dev)} | {spread(test)} "
                         f"| {' '.join(f'{a:.4f}' for a in test)} | {', '.join(f'`{f}`' for f in folders)} |")
        (first, b), *others = by_value.items()
        for value, a in others:
            split_deltas = [difference(*([r[split]["accuracy"] for r in arm] for arm in (a, b)))
                            for split in ("dev", "test")]
            deltas.append(f"- {name}, {setting} {value} − {first}: dev " + ", test ".join(
                f"{100 * d:+.2f} ± {100 * se:.2f} pt" if se is not None else f"{100 * d:+.2f} pt (an arm of one seed)"
                for d, se in split_deltas))
    runs = [r for by_value in compared.values() for results in by_value.values() for r in results]
    p, n = statistics.fmean(r["test"]["accuracy"] for r in runs), runs[0]["test"]["n"]
    se, _ = accuracy_interval(p, n)
    return "\n".join(lines + ["", "Difference of the arms' means ± its standard error "
                              "(√(s₁²/n₁ + s₂²/n₂) over seeds):", ""] + deltas + [
        "", f"One run's test accuracy alone varies by ± {100 * 1.96 * se:.1f} points (binomial 95 % at "
            f"{p:.3f} on {n} sentences)."]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", metavar="folder", help="a folder of run folders (several with --by)")
    p.add_argument("--readme", help="also replace this README's results section")
    p.add_argument("--by", metavar="SETTING", help="compare the folders' runs by this hyperparameter, e.g. bucket")
    p.add_argument("--out", help="with --by: the markdown file to write (a .json beside it)")
    args = p.parse_args(argv)
    if args.by:
        return main_by(args)
    if len(args.folders) > 1 or args.out:
        p.error("one folder, and no --out, without --by")
    folder = args.folders[0]
    runs = collect(folder, TABLE_NEEDS)
    if not runs:
        sys.exit(f"{folder}: no */results.json here; run `make paper` first")
    try:
        check_report(folder)
    except ValueError as e:
        sys.exit(str(e))
    rows = summarise(runs)
    figures = plot_curves(runs, folder)
    table = markdown(rows, figures)
    Path(folder, "report.md").write_text(f"{TITLE}\n\n" + table)
    Path(folder, "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"wrote {Path(folder, 'report.md')} and report.json")
    if args.readme:
        update_readme(args.readme, folder, table)
        print(f"updated {args.readme}")


def main_by(args):
    if not args.out:
        sys.exit("--by needs --out FILE.md, where the comparison is written")
    out = Path(args.out)
    ours = begins_with(out, COMPARED)  # a comparison written before, and its .json beside it
    try:
        for path in (out, out.with_suffix(".json")):
            check_out(path, "pass another --out", own=lambda _: ours, folder=False)
    except ValueError as e:
        sys.exit(str(e))
    compared = arms(args.folders, args.by)
    if not compared:
        sys.exit(f"{' '.join(args.folders)}: no experiment ran with more than one value of {args.by}")
    table = compare_markdown(compared, args.by)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{COMPARED} {args.by}\n\n" + table)
    record = {name: {str(value): arm_summary(results) for value, results in by_value.items()}
              for name, by_value in compared.items()}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.readme:
        command = f"python -m lab.report {' '.join(args.folders)} --by {args.by} --out {args.out} " \
                  f"--readme {args.readme}"
        update_readme(args.readme, out.parent, table, command,
                      (f"<!-- by-{args.by}:start -->", f"<!-- by-{args.by}:end -->"))
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
