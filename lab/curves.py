"""Dev accuracy per classifier epoch, mean ± std over the seeds of each arm, read from the runs'
metrics.jsonl: runs compared epoch by epoch, also those that stopped before their last epoch
(a record without results.json).

    python -m lab.curves "simclr=results/paper/all-MiniLM-L6-v2-e10/simclr-s*" \\
        "views 0.1=results/simclr-readings/all-MiniLM-L6-v2-e10-h200/views-0.1/simclr-s*" --epochs 6

Each argument is NAME=GLOB, the glob naming run folders. The table stops at --epochs, or at the
fewest classifier epochs any run of the table completed. The dev split only: nothing here reads
the test split.
"""

import glob
import statistics
import sys
from pathlib import Path

from minibert.cli import Parser
from minibert.runs import read_metrics


def dev_curve(folder):
    """The run's dev accuracy after each classifier epoch, in order."""
    rows = read_metrics(Path(folder) / "metrics.jsonl")
    return [r["dev_accuracy"] for r in rows if r.get("stage") != "contrastive" and r.get("dev_accuracy") is not None]


def table(arms, epochs=None):
    """arms: name → list of run folders. → a markdown table, one row per arm."""
    curves = {name: [dev_curve(f) for f in folders] for name, folders in arms.items()}
    for name, folders in arms.items():
        for folder, curve in zip(folders, curves[name]):
            if not curve:
                raise ValueError(f"{folder}: no classifier epoch with a dev accuracy in its metrics.jsonl")
    shortest = min(len(c) for runs in curves.values() for c in runs)
    n = min(shortest, epochs or shortest)
    lines = ["| arm | seeds | " + " | ".join(f"epoch {i + 1}" for i in range(n)) + " |",
             "|---|---|" + "---|" * n]
    for name, runs in curves.items():
        cells = []
        for i in range(n):
            values = [c[i] for c in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = Parser(prog="python -m lab.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("arms", nargs="+", metavar="NAME=GLOB", help="an arm's name and the glob of its run folders")
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs to show (default: all in common)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"argument --epochs: must be at least 1, not {args.epochs}")
    arms = {}
    for arm in args.arms:
        name, sep, pattern = arm.partition("=")
        folders = sorted(glob.glob(pattern))
        if not sep or not name or not folders:
            p.error(f"argument {arm!r}: give NAME=GLOB, the glob naming at least one run folder")
        if name in arms:
            p.error(f"argument {arm!r}: the arm {name!r} is named twice; give each arm its own name")
        arms[name] = folders
    try:
        print(table(arms, args.epochs))
    except ValueError as e:
        sys.exit(f"lab.curves: {e}")


if __name__ == "__main__":
    main()
