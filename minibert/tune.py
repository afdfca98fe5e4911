"""Choose the `best` preset on the dev split alone.

    python -m minibert.tune [--model all-MiniLM-L6-v2] [--epochs 1] [--seed 0]

Trains each candidate below with `train.py --no-test`, so the test split is never evaluated,
ranks them by the dev accuracy of the final model, and writes the ranking to
runs/tune/<model>-e<epochs>/tune.json. The `best` preset in experiments.py is the winner.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each candidate changes the paper's baseline hyperparameters in one more way than the last.
CANDIDATES = {
    "paper": [],
    "drop0.1": ["--drop-rate", "0.1"],
    "drop0.1-head256": ["--drop-rate", "0.1", "--hidden-dim", "256"],
    "drop0.1-head256-linear": ["--drop-rate", "0.1", "--hidden-dim", "256", "--scheduler", "linear",
                               "--warmup-ratio", "0.06"],
    "drop0.1-head256-linear-lr2e-4": ["--drop-rate", "0.1", "--hidden-dim", "256", "--scheduler", "linear",
                                      "--warmup-ratio", "0.06", "--lr", "2e-4"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = p.parse_args(argv)
    folder = ROOT / "runs" / "tune" / f"{Path(args.model).name}-e{args.epochs}"
    ranking = []
    for name, flags in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        out = folder / name
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--experiment", "baseline", "--bucket",
                        "--model", args.model, "--epochs", str(args.epochs), "--seed", str(args.seed),
                        "--device", args.device, "--out", str(out), "--resume", "--no-test", *flags],
                       check=True)
        results = json.loads((out / "results.json").read_text())
        assert results["test"] is None  # chosen on dev alone
        ranking.append({"candidate": name, "flags": flags, "dev_accuracy": results["dev"]["accuracy"],
                        "dev_loss": results["dev"]["loss"]})
    ranking.sort(key=lambda r: -r["dev_accuracy"])
    (folder / "tune.json").write_text(json.dumps(ranking, indent=2) + "\n")
    for r in ranking:
        print(f"{r['dev_accuracy']:.4f}  {r['candidate']}")
    print(f"wrote {folder / 'tune.json'}")


if __name__ == "__main__":
    main()
