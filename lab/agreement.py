"""Do runs of one recipe make the same mistakes? Per-run accuracy, the ensemble, the shared errors.

    python -m lab.agreement results/best/all-MiniLM-L6-v2-e10/best-s* --split dev [--show 20]
    python -m lab.agreement runs/best-all-MiniLM-L6-v2-reviews-s* --data reviews.csv [its column flags]

Each run classifies the split. Printed: each run's accuracy; the ensemble that averages their
probabilities, and the majority vote; how many sentences exactly k of the n runs get wrong. When
most errors are made by every run, more seeds (or their ensemble) cannot remove them: they sit in
the encoder or in the labels, and `--show` prints some to read. With --out, the figures (no
sentences, only their ids) go to a JSON file.
"""

import random
import sys

import torch

from minibert.cli import Parser
from minibert.data import add_data_flags, encode, source_from
from minibert.evaluation import accuracy_interval, predict
from minibert.fetch import DownloadError
from minibert.runs import check_out, check_run_data, load_model, record_with, run_data, write_json


def parse_args(argv=None):
    p = Parser(prog="python -m lab.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by train.py (two or more)")
    p.add_argument("--split", choices=["dev", "test"], default="dev", help="the split to classify (default dev)")
    add_data_flags(p)  # the runs' data: MASSIVE, or the file of your own they trained on, with its flags
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print N sentences (a fixed random sample) that every run gets wrong, with the gold label "
                        "and the first run's")
    p.add_argument("--out", default=None, metavar="PATH", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if len(args.run_dirs) < 2:
        p.error("give two or more RUN_DIRs: agreement compares runs")
    if args.show < 0:
        p.error(f"--show {args.show}: give a count of 0 or more")
    return args


def agreement(probabilities, labels):
    """probabilities: (runs, N, n_labels); labels: (N,) → the figures, and the mask of sentences
    every run gets wrong."""
    n_runs = probabilities.shape[0]
    predicted = probabilities.argmax(-1)  # (runs, N)
    wrong = predicted != labels  # (runs, N)
    votes = torch.nn.functional.one_hot(predicted, probabilities.shape[-1]).sum(0)  # (N, n_labels)
    # A tie goes to the first run's label where it is among the tied ones (only an even count ties).
    first = predicted[0]
    first_tied = votes[torch.arange(len(first)), first] == votes.max(-1).values
    majority = torch.where(first_tied, first, votes.argmax(-1))

    def accuracy(p):
        return (p == labels).float().mean().item()

    wrong_by = wrong.sum(0)  # (N,) how many runs get each sentence wrong
    return {
        "n": len(labels),
        "runs": n_runs,
        "accuracy_per_run": [accuracy(p) for p in predicted],
        "mean_probability_ensemble_accuracy": accuracy(probabilities.mean(0).argmax(-1)),
        "majority_vote_accuracy": accuracy(majority),
        "sentences_wrong_by_k_runs": {k: int((wrong_by == k).sum()) for k in range(n_runs + 1)},
        "errors_per_run": wrong.sum(1).tolist(),
        "wrong_by_every_run": int(wrong.all(0).sum()),
        "wrong_by_any_run": int(wrong.any(0).sum()),
    }, wrong.all(0)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"python -m lab.agreement: {e}")


def run(args):
    if args.out:  # rewritten only if it holds the figures of an agreement
        check_out(args.out, "pass another --out", folder=False,
                  own=lambda path: record_with(path, ("accuracy_per_run", "runs")))
    metas, probabilities, source, data = [], [], source_from(args), None
    for run_dir in args.run_dirs:
        model, tokenizer, meta = load_model(run_dir)
        if metas and (meta["label_kind"], meta["labels"]) != (metas[0]["label_kind"], metas[0]["labels"]):
            raise ValueError(f"{run_dir} predicts other labels ({meta['label_kind']}) than {args.run_dirs[0]} "
                             f"({metas[0]['label_kind']}); compare runs of one label set")
        if data is None:  # loaded once; each run checked against it, as evaluate.py checks one
            data = run_data(run_dir, meta, source)
            examples = data.split(args.split)
        else:
            check_run_data(run_dir, meta, source, data)
        encoded = encode(tokenizer, examples, data.label_ids(examples), meta["max_len"])
        probabilities.append(predict(model, encoded, torch.device("cpu")).softmax(-1))
        metas.append(meta)
    result, every = agreement(torch.stack(probabilities), encoded.labels)
    n, single = result["n"], result["accuracy_per_run"]
    print(f"{args.split}: {n} sentences, {len(single)} runs")
    for run_dir, acc, errors in zip(args.run_dirs, single, result["errors_per_run"]):
        print(f"  {acc:.4f} ({errors} wrong)  {run_dir}")
    low, high = accuracy_interval(result["mean_probability_ensemble_accuracy"], n)[1]
    print(f"  ensemble (mean probability) {result['mean_probability_ensemble_accuracy']:.4f} "
          f"(95% interval {low:.4f} to {high:.4f}); majority vote {result['majority_vote_accuracy']:.4f}")
    print("  sentences wrong in k runs: " + ", ".join(f"k={k}: {c}" for k, c in
                                                     result["sentences_wrong_by_k_runs"].items()))
    print(f"  wrong in every run: {result['wrong_by_every_run']} of the {result['wrong_by_any_run']} "
          "wrong in any")
    names = data.labels
    shown = every.nonzero().squeeze(1).tolist()
    shown = sorted(random.Random(0).sample(shown, min(args.show, len(shown))))
    for i in shown:
        print(f"  gold {names[encoded.labels[i]]:<15} → {names[probabilities[0][i].argmax()]:<15} {examples[i].text}")
    if args.out:
        result.update(split=args.split, run_dirs=args.run_dirs,
                      ids_wrong_by_every_run=[examples[i].id for i in every.nonzero().squeeze(1).tolist()])
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
