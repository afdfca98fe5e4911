"""Evaluate a trained run, the untrained model (zero-shot), or classify a sentence.

    python evaluate.py runs/baseline-all-MiniLM-L6-v2-s0 [--split dev|test]
    python evaluate.py runs/baseline-all-MiniLM-L6-v2-s0 --predict "wake me up at seven"
    python evaluate.py --zero-shot --model all-MiniLM-L6-v2      # the paper's experiment 1
"""

import platform
import shlex
import sys
from pathlib import Path

import torch

from minibert.classifier import ScenarioClassifier
from minibert.cli import Parser
from minibert.data import encode, load_massive
from minibert.embeddings import alignment, embed, knn_accuracy, pca_2d, plot, uniformity
from minibert.evaluation import confused_pairs, metrics, per_label_accuracy, predict
from minibert.experiments import TrainConfig
from minibert.fetch import DownloadError
from minibert.runs import FORMAT, device_name, load_run, write_json
from minibert.weights import load_pretrained


def parse_args(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a run folder written by train.py")
    p.add_argument("--split", choices=["dev", "test"], default=None, help="with RUN_DIR: the split to evaluate "
                   "(default test)")
    p.add_argument("--data", default=None, help="MASSIVE en-US.jsonl (default: $MASSIVE_JSONL or data/massive/)")
    p.add_argument("--predict", metavar="TEXT", help="classify one sentence instead")
    p.add_argument("--zero-shot", action="store_true", help="pretrained encoder, freshly initialised head")
    p.add_argument("--embeddings", action="store_true",
                   help="analyse the [CLS] embeddings: alignment, uniformity, k-NN accuracy, PCA picture")
    p.add_argument("--model", default=None,
                   help="with --zero-shot: which pretrained model (default auto); with RUN_DIR: "
                        "the model the run must have been trained from")
    p.add_argument("--seed", type=int, default=None, help="with --zero-shot: seed of the untrained head (default 0)")
    p.add_argument("--out", default=None, help="with --zero-shot: run folder for its results.json")
    args = p.parse_args(argv)
    if args.zero_shot == bool(args.run_dir):
        p.error("give either RUN_DIR or --zero-shot")
    if args.predict and (args.zero_shot or args.embeddings):
        p.error("--predict needs a trained RUN_DIR and nothing else")
    for name in ("seed", "out"):
        if getattr(args, name) is not None and not args.zero_shot:
            p.error(f"--{name} applies to --zero-shot only (a run's seed is fixed, its records go to RUN_DIR)")
    if args.split and (args.zero_shot or args.predict or args.embeddings):
        p.error("--split applies to evaluating RUN_DIR only (--zero-shot and --embeddings use the test split)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; pass a folder")
    return args


def report(split_name, logits, labels, names):
    result = metrics(logits, labels)
    result["per_label_accuracy"] = per_label_accuracy(logits, labels, names)
    result["most_confused"] = confused_pairs(logits, labels, names)
    print(f"{split_name}: loss {result['loss']:.4f} (paper's sum over {result['n_batches']} batches: "
          f"{result['loss_paper_sum']:.4f}) accuracy {result['accuracy']:.4f} on {result['n']} sentences")
    for name, acc in sorted(result["per_label_accuracy"].items(), key=lambda kv: kv[1]):
        print(f"  {name:<16} {acc:.4f}")
    for pair in result["most_confused"]:
        print(f"  confused: {pair['true']} → {pair['predicted']} ({pair['count']}×)")
    return result


def analyse_embeddings(model, tokenizer, data, max_len, out_dir, title):
    """The representation analysis on the test split, against the training split for k-NN."""
    splits = {name: encode(tokenizer, data.split(name), data.label_ids(data.split(name), "scenario"), max_len)
              for name in ("train", "test")}
    z = {name: embed(model, encoded) for name, encoded in splits.items()}
    labels = {name: encoded.labels for name, encoded in splits.items()}
    result = {
        "alignment": alignment(z["test"], labels["test"]),
        "uniformity": uniformity(z["test"]),
        "knn_accuracy": knn_accuracy(z["train"], labels["train"], z["test"], labels["test"], k=10),
    }
    print(f"embeddings ({title}): alignment {result['alignment']:.4f} uniformity {result['uniformity']:.4f} "
          f"10-NN accuracy {result['knn_accuracy']:.4f}")
    picture = Path(out_dir) / "embeddings-pca.png"
    if plot(pca_2d(z["test"]), labels["test"], data.labels, picture, f"[CLS] embeddings, test split: {title}"):
        result["picture"] = picture.name
        print(f"wrote {picture}")
    else:
        print("matplotlib is not installed (pip install -e '.[plot]'): no picture, numbers above")
    write_json(Path(out_dir) / "embeddings.json", result)
    return result


def zero_shot(args, argv):
    """The paper's experiment 1: no training at all, so accuracy lands near chance (1/18)."""
    config = TrainConfig(experiment="zeroshot", model=args.model or "auto", seed=args.seed or 0, epochs=0)
    data = load_massive(args.data)
    torch.manual_seed(config.seed)
    encoder, tokenizer, _ = load_pretrained(config.model)
    model = ScenarioClassifier(encoder, len(data.labels), config.hidden_dim, config.drop_rate)
    test = encode(tokenizer, data.test, data.label_ids(data.test, "scenario"), config.max_len)
    result = report("test (zero-shot)", predict(model, test, torch.device("cpu")), test.labels, data.labels)
    run_dir = Path(args.out or f"runs/zeroshot-{Path(encoder.name).name}-s{config.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.embeddings:
        analyse_embeddings(model, tokenizer, data, config.max_len, run_dir, f"pretrained {encoder.name}")
    write_json(run_dir / "results.json", {
        "format": FORMAT, "experiment": "zeroshot", "model": encoder.name, "model_requested": config.model,
        "hyperparameters": config.to_dict(), "seed": config.seed, "device": device_name(torch.device("cpu")),
        "precision": "fp32",
        "torch": torch.__version__, "python": platform.python_version(), "test": result,
        "dev_accuracy_per_epoch": [], "wall_seconds": 0.0,
        "command": "python evaluate.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    })
    print(f"wrote {run_dir}/results.json")


def main(argv=None):
    args = parse_args(argv)
    try:
        return zero_shot(args, argv) if args.zero_shot else evaluate_run(args)
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"evaluate.py: {e}")


def evaluate_run(args):
    model, tokenizer, meta = load_run(args.run_dir)
    if args.model and args.model != meta["model"]:
        raise ValueError(f"{args.run_dir} was trained from {meta['model']}, not {args.model}")
    if args.predict:
        input_ids, attention_mask = tokenizer([args.predict], max_len=meta["max_len"])
        with torch.no_grad():
            probs = model(input_ids, attention_mask).softmax(-1)[0]
        p, i = probs.max(0)
        print(f"{meta['labels'][i]} ({p:.3f})")
        return
    if args.embeddings:
        # Measured by scenario whatever labels the run trained on, so that every run compares.
        data = load_massive(args.data)
        analyse_embeddings(model, tokenizer, data, meta["max_len"], args.run_dir, Path(args.run_dir).name)
        return
    data = load_massive(args.data, labels=meta["label_kind"])
    if list(data.labels) != meta["labels"]:
        raise ValueError(f"the run's {len(meta['labels'])} labels do not match the data's "
                         f"{len(data.labels)} {meta['label_kind']} labels; pass the --data it was trained on")
    split = args.split or "test"
    examples = data.split(split)
    encoded = encode(tokenizer, examples, data.label_ids(examples, meta["label_kind"]), meta["max_len"])
    logits = predict(model, encoded, torch.device("cpu"))
    result = report(split, logits, encoded.labels, data.labels)
    write_json(Path(args.run_dir) / f"eval-{split}.json", {"model": meta["model"], **result})
    print(f"wrote {Path(args.run_dir) / f'eval-{split}.json'}")


if __name__ == "__main__":
    main()
