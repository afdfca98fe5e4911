"""Evaluate a trained run, the untrained model (zero-shot), or classify a sentence.

    python evaluate.py runs/baseline-all-MiniLM-L6-v2-s0 [--split dev|test]
    python evaluate.py runs/baseline-all-MiniLM-L6-v2-s0 --predict "wake me up at seven"
    python evaluate.py runs/baseline-all-MiniLM-L6-v2-s0 --predict-file sentences.txt   # - for standard input
    python evaluate.py --zero-shot --model all-MiniLM-L6-v2      # the paper's experiment 1
"""

import shlex
import sys
from pathlib import Path

import torch

from minibert.classifier import ScenarioClassifier
from minibert.cli import Parser
from minibert.data import add_data_flags, describe, encode, load_data, same_source, source_from
from minibert.representations import alignment, embed, knn_accuracy, pca_2d, plot, uniformity
from minibert.evaluation import (accuracy_interval, confused_pairs, confusion_matrix, label_metrics, metrics,
                                 per_label_accuracy, plot_confusion, predict, weight_changes)
from minibert.experiments import CHOICES, MAX_SEED, TrainConfig, as_recorded
from minibert.fetch import DownloadError
from minibert.predictor import TrainedRun
from minibert.device import device_name, pick_device
from minibert.runs import (check_out, default_run_dir, load_model, read_results, run_data, write_csv, write_json,
                           write_results)
from minibert.weights import load_pretrained


def parse_args(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a run folder written by train.py")
    p.add_argument("--split", choices=["dev", "test"], default=None, help="with RUN_DIR: the split to evaluate "
                   "(default test)")
    sentences = p.add_mutually_exclusive_group()
    sentences.add_argument("--predict", metavar="TEXT", help="classify one sentence instead")
    sentences.add_argument("--predict-file", metavar="PATH",
                           help="classify every line of PATH instead (- reads standard input); prints "
                                "label, probability and sentence, tab-separated")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None,
                   help="with RUN_DIR: where the model runs (default auto: cuda, then mps, then cpu)")
    p.add_argument("--zero-shot", action="store_true", help="pretrained encoder, freshly initialised head")
    p.add_argument("--embeddings", action="store_true",
                   help="analyse the sentence vectors ([CLS], or the mean where the run pools so): alignment, "
                        "uniformity, k-NN accuracy, PCA picture")
    p.add_argument("--weight-changes", action="store_true",
                   help="with RUN_DIR: how far training moved each weight matrix of the encoder from the "
                        "pretrained one, per layer (relative Frobenius norm)")
    p.add_argument("--model", default=None,
                   help="with --zero-shot: which pretrained model (default auto); with RUN_DIR: "
                        "the model the run must have been trained from")
    p.add_argument("--seed", type=int, default=None, help="with --zero-shot: seed of the untrained head (default 0)")
    p.add_argument("--pooling", choices=CHOICES["pooling"], default=None,
                   help="with --zero-shot: the sentence vector the head and --embeddings read (default cls, the "
                        "paper's); a run reads what it was trained with")
    p.add_argument("--out", default=None, help="with --zero-shot: run folder for its results.json")
    add_data_flags(p)
    args = p.parse_args(argv)
    if args.zero_shot == bool(args.run_dir):
        p.error("give either RUN_DIR or --zero-shot")
    # An empty sentence is refused, not taken for none (which would evaluate the test split instead).
    if args.predict is not None and not args.predict.strip():
        p.error(f"--predict {args.predict!r}: an empty sentence; give the text to classify")
    if args.predict_file == "":
        p.error("--predict-file '': no file named; give a path, or - for standard input")
    predicting = args.predict is not None or args.predict_file is not None
    if predicting and (args.zero_shot or args.embeddings):
        p.error("--predict and --predict-file need a trained RUN_DIR and nothing else")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed}: must be a whole number from 0 to {MAX_SEED}")
    for name in ("seed", "out"):
        if getattr(args, name) is not None and not args.zero_shot:
            p.error(f"--{name} applies to --zero-shot only (a run's seed is fixed, its records go to RUN_DIR)")
    if args.pooling and not args.zero_shot:
        p.error("--pooling applies to --zero-shot only (a run reads the pooling it was trained with)")
    if args.weight_changes and (args.zero_shot or predicting or args.embeddings):
        p.error("--weight-changes needs a trained RUN_DIR and nothing else")
    if args.split and (args.zero_shot or predicting or args.embeddings or args.weight_changes):
        p.error("--split applies to evaluating RUN_DIR only (--zero-shot and --embeddings use the test split, "
                "--weight-changes none)")
    if args.device and (args.zero_shot or args.embeddings or args.weight_changes):
        p.error("--device applies to evaluating RUN_DIR and to --predict only (--zero-shot, --embeddings and "
                "--weight-changes run on the CPU)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; pass a folder")
    return args


# What a zero-shot run writes before its results.json, and train.log, its output where lab.paper sends it.
ZERO_SHOT_STARTED = ("embeddings.json", "embeddings-pca.png", "train.log")


def check_zero_shot_folder(folder, config, source):
    """A zero-shot record is rewritten in place only by the same one (model, seed, pooling, data),
    which it equals: never over a trained run's files, another zero-shot record, or anything else
    the zero-shot run did not write."""
    held = [name for name in ("checkpoint.safetensors", "model.safetensors") if (folder / name).exists()]
    if held:
        raise ValueError(f"{folder} holds a trained run ({', '.join(held)}); pass --out a folder of its own")
    if not (folder / "results.json").exists():
        check_out(folder, "pass --out a folder of its own", own=lambda entry: entry.name in ZERO_SHOT_STARTED)
        return
    try:
        record = read_results(folder / "results.json", fix="the file is damaged")
    except ValueError as e:
        raise ValueError(f"{e}; delete it, or pass --out another folder") from None
    if record.get("experiment") != "zeroshot":
        raise ValueError(f"{folder} holds the record of a trained run (results.json), which the zero-shot record "
                         "would replace; pass --out a folder of its own")
    then = {"model": record.get("model_requested"), "seed": record.get("seed"),
            "pooling": as_recorded(record.get("hyperparameters") or {})["pooling"]}
    now = {"model": config.model, "seed": config.seed, "pooling": config.pooling}
    differ = [f"{k} {then[k]!r}, not {now[k]!r}" for k in now if then[k] != now[k]]
    if not same_source(record.get("data"), source):
        differ.append(f"data {record.get('data') or {'format': 'massive'}}")
    if differ:
        raise ValueError(f"{folder} holds another zero-shot record ({'; '.join(differ)}); pass --out a folder of "
                         "its own, or delete that one")


def report(split_name, logits, labels, names):
    result = metrics(logits, labels)
    result["accuracy_se"], result["accuracy_ci95"] = accuracy_interval(result["accuracy"], result["n"])
    result.update(label_metrics(confusion_matrix(logits.argmax(1), labels, len(names)), names))
    result["per_label_accuracy"] = per_label_accuracy(logits, labels, names)
    result["most_confused"] = confused_pairs(logits, labels, names)
    low, high = result["accuracy_ci95"]
    print(f"{split_name}: loss {result['loss']:.4f} (paper's sum over {result['n_batches']} batches: "
          f"{result['loss_paper_sum']:.4f}) accuracy {result['accuracy']:.4f} ± {result['accuracy_se']:.4f} "
          f"(95% interval {low:.4f} to {high:.4f}) on {result['n']} sentences; macro-F1 {result['macro_f1']:.4f}")
    print(f"  {'':<16} precision recall     F1 support")
    for name, m in sorted(result["per_label"].items(), key=lambda kv: kv[1]["f1"]):
        print(f"  {name:<16} {m['precision']:9.4f} {m['recall']:6.4f} {m['f1']:6.4f} {m['support']:7d}")
    for pair in result["most_confused"]:
        print(f"  confused: {pair['true']} → {pair['predicted']} ({pair['count']}×)")
    return result


def analyse_embeddings(model, tokenizer, data, max_len, out_dir, title):
    """The representation analysis on the test split, against the training split for k-NN."""
    splits = {name: encode(tokenizer, data.split(name), data.label_ids(data.split(name)), max_len)
              for name in ("train", "test")}
    z = {name: embed(model, encoded) for name, encoded in splits.items()}
    labels = {name: encoded.labels for name, encoded in splits.items()}
    result = {
        "alignment": alignment(z["test"], labels["test"]),
        "uniformity": uniformity(z["test"]),
        "knn_accuracy": knn_accuracy(z["train"], labels["train"], z["test"], labels["test"], k=10),
        "pooling": model.pooling,
    }
    print(f"embeddings ({title}): alignment {result['alignment']:.4f} uniformity {result['uniformity']:.4f} "
          f"10-NN accuracy {result['knn_accuracy']:.4f}")
    picture = Path(out_dir) / "embeddings-pca.png"
    vectors = "[CLS]" if model.pooling == "cls" else "mean-pooled"
    if plot(pca_2d(z["test"]), labels["test"], data.labels, picture, f"{vectors} embeddings, test split: {title}"):
        result["picture"] = picture.name
        print(f"wrote {picture}")
    else:
        print("matplotlib is not installed (pip install -e '.[plot]'): no picture, numbers above")
    write_json(Path(out_dir) / "embeddings.json", result)
    return result


def zero_shot(args, argv):
    """The paper's experiment 1: no training at all, so accuracy lands near chance (one over the number of labels)."""
    config = TrainConfig(experiment="zeroshot", model=args.model or "auto", seed=args.seed or 0, epochs=0,
                         pooling=args.pooling or "cls")
    source = source_from(args)
    if args.out:
        check_zero_shot_folder(Path(args.out), config, source)  # before anything loads
    data = load_data(source)
    torch.manual_seed(config.seed)
    encoder, tokenizer, _ = load_pretrained(config.model)
    if encoder.config.max_position_embeddings < config.max_len:
        raise ValueError(f"{encoder.name}: {encoder.config.max_position_embeddings} positions, fewer than the "
                         f"{config.max_len} word-pieces the zero-shot row reads; give a model with more")
    model = ScenarioClassifier(encoder, len(data.labels), config.hidden_dim, config.drop_rate, pooling=config.pooling)
    test = encode(tokenizer, data.test, data.label_ids(data.test), config.max_len)
    result = report("test (zero-shot)", predict(model, test, torch.device("cpu")), test.labels, data.labels)
    pooled = "" if config.pooling == "cls" else f"-{config.pooling}"
    run_dir = Path(args.out) if args.out else default_run_dir("zeroshot", encoder.name, source, config.seed, pooled)
    if not args.out:
        check_zero_shot_folder(run_dir, config, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.embeddings:
        analyse_embeddings(model, tokenizer, data, config.max_len, run_dir, f"pretrained {encoder.name}")
    write_results(run_dir, "python evaluate.py " + shlex.join(sys.argv[1:] if argv is None else argv), {
        "experiment": "zeroshot", "model": encoder.name, "model_requested": config.model,
        "hyperparameters": config.to_dict(), "seed": config.seed, "data": describe(source, data),
        "device": device_name(torch.device("cpu")),
        "precision": "fp32", "test": result, "dev_accuracy_per_epoch": [], "wall_seconds": 0.0,
    })
    print(f"wrote {run_dir}/results.json")


def main(argv=None):
    args = parse_args(argv)
    try:
        return zero_shot(args, argv) if args.zero_shot else evaluate_run(args)
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"evaluate.py: {e}")


def evaluate_run(args):
    device = torch.device("cpu") if args.embeddings or args.weight_changes else pick_device(args.device or "auto")
    model, tokenizer, meta = load_model(args.run_dir)
    model.to(device)
    if args.model and args.model != meta["model"]:
        raise ValueError(f"{args.run_dir} was trained from {meta['model']}, not {args.model}")
    if args.predict is not None:  # what minibert.load_run(RUN_DIR).predict returns
        labels, probabilities = TrainedRun(model, tokenizer, meta, device).predict([args.predict])
        print(f"{labels[0]} ({probabilities[0].max():.3f})")
        return
    if args.predict_file is not None:
        sentences = read_sentences(args.predict_file)
        labels, probabilities = TrainedRun(model, tokenizer, meta, device).predict(sentences)
        for label, p, sentence in zip(labels, probabilities.max(1).values.tolist(), sentences):
            print(f"{label}\t{p:.4f}\t{sentence}")
        return
    if args.weight_changes:
        return report_weight_changes(model, meta, Path(args.run_dir))
    source = source_from(args)
    if args.embeddings:
        # MASSIVE's runs are measured by scenario whatever labels they trained on, so that every run compares;
        # a run on data of your own, on the split it trained on.
        own_run = meta["label_kind"] not in ("scenario", "intent")
        data = run_data(args.run_dir, meta, source) if source.own or own_run else load_data(source)
        analyse_embeddings(model, tokenizer, data, meta["max_len"], args.run_dir, Path(args.run_dir).name)
        return
    data = run_data(args.run_dir, meta, source)
    split = args.split or "test"
    examples = data.split(split)
    encoded = encode(tokenizer, examples, data.label_ids(examples), meta["max_len"])
    logits = predict(model, encoded, device, fast=device.type == "cuda")  # a GPU replays a CUDA graph
    result = report(split, logits, encoded.labels, data.labels)
    run_dir = Path(args.run_dir)
    write_json(run_dir / f"eval-{split}.json", {"model": meta["model"], "device": device_name(device), **result})
    print(f"wrote {run_dir / f'eval-{split}.json'}")
    write_split_records(run_dir, split, examples, logits, encoded.labels, data.labels)


def write_split_records(run_dir, split, examples, logits, labels, names):
    """confusion-<split>.csv (rows gold, columns predicted) with its picture, and predictions-<split>.csv:
    one row per sentence, with the probability the model gives its predicted label."""
    predicted = logits.argmax(1)
    probability = logits.softmax(-1).gather(1, predicted[:, None]).squeeze(1)
    confusion = confusion_matrix(predicted, labels, len(names))
    write_csv(run_dir / f"confusion-{split}.csv",
              [["gold \\ predicted", *names], *([name, *row] for name, row in zip(names, confusion.tolist()))])
    write_csv(run_dir / f"predictions-{split}.csv",
              [["id", "utterance", "gold", "predicted", "probability"],
               *([e.id, e.text, names[g], names[p], f"{q:.4f}"]
                 for e, g, p, q in zip(examples, labels.tolist(), predicted.tolist(), probability.tolist()))])
    print(f"wrote {run_dir / f'confusion-{split}.csv'} and {run_dir / f'predictions-{split}.csv'}")
    picture = run_dir / f"confusion-{split}.png"
    if plot_confusion(confusion, names, picture, f"{run_dir.name}, {split} split"):
        print(f"wrote {picture}")
    else:
        print("matplotlib is not installed (pip install -e '.[plot]'): no confusion picture, the CSV holds it")


def report_weight_changes(model, meta, run_dir):
    """weight-changes.json, and a table: one row per layer, one column per weight matrix."""
    pretrained, _, _ = load_pretrained(meta["model"])
    if pretrained.config.to_dict() != meta["encoder"]:
        raise ValueError(f"{run_dir}: the pretrained {meta['model']} found now is not the one trained")
    changes = weight_changes(model.encoder, pretrained)
    write_json(run_dir / "weight-changes.json", {"model": meta["model"], "relative_change": changes})
    columns = list(dict.fromkeys(name.split(".", 2)[2] for name in changes))
    print(f"‖W − W₀‖ / ‖W₀‖ in %, {run_dir.name}:")
    print("layer " + " ".join(f"{c:>16}" for c in columns))
    for layer in range(pretrained.config.num_hidden_layers):
        print(f"{layer:>5} " + " ".join(f"{100 * changes[f'layers.{layer}.{c}']:>16.3f}" for c in columns))
    print(f"wrote {run_dir / 'weight-changes.json'}")


def read_sentences(path):
    """One sentence per line of `path`, or of standard input for `-`; blank lines are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--predict-file {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--predict-file {path}: not UTF-8 text (byte {e.start + 1})") from None
    text = text.removeprefix("\ufeff")  # the byte-order mark some editors begin a UTF-8 file with
    # Lines end at \n (or \r\n) only: splitlines() would also cut a sentence at U+2028 or a form feed.
    sentences = [line.strip() for line in text.split("\n") if line.strip()]
    if not sentences:
        raise ValueError(f"--predict-file {path}: no sentences; give one per line")
    return sentences


if __name__ == "__main__":
    main()
