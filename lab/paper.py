"""The paper's table: every experiment for several seeds, then the report.

    python -m lab.paper results/paper/all-MiniLM-L6-v2-e10 --model all-MiniLM-L6-v2 --epochs 10 --seeds 3

Seed 0 of every row runs first (a whole table), then the other seeds. A finished run is kept, an
interrupted one resumes from its last epoch. With --jobs N, N runs go side by side, the CPU's
cores shared out among them unless OMP_NUM_THREADS says how many threads each run gets; each run's
output goes to its folder's train.log.
"""

import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab import report
from minibert.cli import Parser
from minibert.experiments import MAX_EPOCHS, PAPER, PRESETS
from minibert.fetch import DownloadError
from minibert.runs import run_records
from minibert.weights import resolve

ROWS = ["zeroshot", *PAPER]
BEYOND = [name for name in PRESETS if name not in PAPER]  # presets beyond the paper, run with --rows
ROOT = Path(__file__).resolve().parents[1]
MAX_RUNS = 1000  # seeds, or runs side by side: more is a slip, refused before the first run


def commands(folder, model, epochs, seeds, device, rows=ROWS, flags=()):
    """→ [(run folder, argv)] of the runs not finished yet, in the order they should start. A row
    whose settings cannot work at this length (SWA needs 5 epochs or more) is left out, said once."""
    runnable = [row for row in rows if row == "zeroshot" or works(row, epochs)]
    todo = []
    for seed in range(seeds):
        for row in runnable:
            out = Path(folder) / f"{row}-s{seed}"
            if (out / "results.json").exists():
                continue
            if row == "zeroshot":
                argv = ["evaluate.py", "--zero-shot", "--model", model, "--seed", str(seed), "--out", str(out)]
            else:
                argv = ["train.py", "--experiment", row, "--model", model, "--epochs", str(epochs),
                        "--seed", str(seed), "--device", device, "--out", str(out), "--resume", *flags]
            todo.append((out, [sys.executable, *argv]))
    return todo


def works(row, epochs):
    try:
        PRESETS[row].override(epochs=epochs).check()
        return True
    except ValueError as e:
        print(f"{row} is left out: {e}")
        return False


def threads_per_run(jobs, environ=os.environ):
    """OMP_NUM_THREADS where the caller set it (e.g. 1, to keep cores free for other work), else
    the cores shared out among `jobs` runs."""
    setting = environ.get("OMP_NUM_THREADS", "").strip()
    if not setting:
        return max(1, (os.cpu_count() or 1) // jobs)
    if not setting.isdigit() or int(setting) < 1:
        sys.exit(f"OMP_NUM_THREADS={setting!r}: set it to a whole number of threads per run (1 or more), "
                 "or unset it to share the cores out")
    return int(setting)


def run_one(out, argv, threads):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"start {out.name}: {' '.join(argv[1:])}", flush=True)
    with open(out / "train.log", "a") as log:
        code = subprocess.call(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"{'done' if code == 0 else f'FAILED ({code}), see its train.log:'} {out}", flush=True)
    return code


def main(argv=None):
    p = Parser(prog="python -m lab.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where the run folders go")
    p.add_argument("--model", default="auto")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1: one run uses every core)")
    p.add_argument("--rows", nargs="+", choices=[*ROWS, *BEYOND], default=ROWS,
                   help="experiments (default: the paper's nine)")
    p.add_argument("--flags", default="", help="more train.py flags for every run, e.g. --flags=--bucket")
    args = p.parse_args(argv)
    if not (1 <= args.jobs <= MAX_RUNS and 1 <= args.seeds <= MAX_RUNS and 1 <= args.epochs <= MAX_EPOCHS):
        p.error(f"--jobs and --seeds must be from 1 to {MAX_RUNS}, and --epochs from 1 to {MAX_EPOCHS}")
    try:  # decided and fetched once, so that every run trains the same model
        model, _ = resolve(args.model)
        report.check_report(args.folder)  # before the first run: the report is written after the last
        todo = commands(args.folder, model, args.epochs, args.seeds, args.device, args.rows, shlex.split(args.flags))
        failed = run_all(todo, args.jobs)
    except (ValueError, DownloadError) as e:
        sys.exit(f"python -m lab.paper: {e}")
    report.main([args.folder])
    if failed:
        sys.exit(f"python -m lab.paper: {failed} of {len(todo)} runs failed; see their train.log")


def run_all(todo, jobs):
    """Run [(folder, argv)] `jobs` at a time → how many failed. Each run gets OMP_NUM_THREADS threads
    where it is set, else an equal share of the cores. Every folder is checked before the first
    run starts: a run's own, or nothing a run did not write (ValueError)."""
    for out, _ in todo:
        run_records(out, "move it, or pass another folder for the runs")
    threads = threads_per_run(jobs)
    told = " (OMP_NUM_THREADS)" if os.environ.get("OMP_NUM_THREADS", "").strip() else ""
    print(f"{len(todo)} runs to go, {jobs} at a time, {threads} threads each{told}")
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda job: run_one(*job, threads), todo))
    return sum(code != 0 for code in codes)


if __name__ == "__main__":
    main()
