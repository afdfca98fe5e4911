"""What a contrastive stage 1 did to the encoder: the sentence vectors' alignment, uniformity and
10-NN accuracy at its end, read from the run's checkpoint of that epoch.

    python -m lab.stage1 runs/simclr-all-MiniLM-L6-v2-s0/checkpoint.safetensors --model all-MiniLM-L6-v2 \\
        --out results/authors/all-MiniLM-L6-v2-e10/simclr-swa-cosine-s0/stage1-embeddings.json
    python -m lab.stage1 --train FOLDER [train.py flags]    # train stage 1 alone, then measure

With --train, train.py's own setup and loop run the contrastive epochs of the flags given (its
classifier stage is not run) into FOLDER, whose metrics.jsonl and stage1-embeddings.json remain.

A run keeps one checkpoint, its last completed epoch's: copy it when the last contrastive epoch has
completed (its metadata's epoch equals the run's contrastive epochs). The figures are those that
`evaluate.py --embeddings` gives a finished run ([CLS] vectors of the test split, k-NN against the
train split), so they compare with results/representations/pretrained/embeddings.json.
"""

import sys
from pathlib import Path

import torch

from minibert.classifier import ScenarioClassifier
from minibert.cli import Parser
from minibert.data import encode, load_massive
from minibert.experiments import TrainConfig, as_recorded
from minibert.fetch import DownloadError
from minibert.representations import alignment, embed, knn_accuracy, uniformity
from minibert.runs import check_out, checkpoint_state, load_into, load_tensors, record_with, write_json
from minibert.weights import load_pretrained


def train_stage1(folder, flags):
    """Run the contrastive epochs of `flags` with train.py into `folder` → its checkpoint at the end of stage 1."""
    import train

    run = train.setup(train.parse_args([*flags, "--out", str(folder), "--no-test"]))
    if not run.config.stage1_epochs:
        sys.exit("python -m lab.stage1 --train: the flags train no contrastive stage; pass --loss simclr or supcon "
                 "with --contrastive-epochs N")
    for epoch in range(run.start_epoch, run.config.stage1_epochs):
        train.train_epoch(run, epoch)
    return run.checkpoint, ["--model", run.config.model, *(["--data", run.args.data] if run.args.data else [])]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--train"]:
        if len(argv) < 2:
            sys.exit("python -m lab.stage1 --train FOLDER [train.py flags]: name the folder")
        folder = Path(argv[1])
        checkpoint, source = train_stage1(folder, argv[2:])
        return main([str(checkpoint), *source, "--out", str(folder / "stage1-embeddings.json")])
    p = Parser(prog="python -m lab.stage1", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a contrastive run's checkpoint.safetensors, copied at the end of stage 1")
    p.add_argument("--model", required=True, help="the pretrained model the run started from")
    p.add_argument("--data", default=None, help="MASSIVE en-US.jsonl (default: $MASSIVE_JSONL or data/massive/)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file as well")
    args = p.parse_args(argv)
    try:
        if args.out:  # rewritten only if it holds the figures of a stage 1
            check_out(args.out, "pass another --out", folder=False,
                      own=lambda path: record_with(path, ("knn_accuracy", "epoch", "loss")))
        state = checkpoint_state(args.checkpoint)
        config = TrainConfig(**as_recorded(state["config"]))
        if config.loss == "ce" or state["epoch"] != config.stage1_epochs:
            raise ValueError(f"{args.checkpoint}: epoch {state['epoch']} of a run whose stage 1 has "
                             f"{config.stage1_epochs} ({config.loss}); copy the checkpoint when its last "
                             "contrastive epoch completes")
        encoder, tokenizer, _ = load_pretrained(args.model)
        model = ScenarioClassifier(encoder, 18, pooling=config.pooling)
        tensors, _ = load_tensors(args.checkpoint)
        load_into(model.encoder, tensors, args.checkpoint, prefix="model.classifier.encoder.")
        data = load_massive(args.data)
    except (ValueError, DownloadError, OSError) as e:
        sys.exit(f"python -m lab.stage1: {e}")
    splits = {name: encode(tokenizer, data.split(name), data.label_ids(data.split(name)),
                           config.max_len) for name in ("train", "test")}
    with torch.no_grad():
        z = {name: embed(model, encoded) for name, encoded in splits.items()}
    labels = {name: encoded.labels for name, encoded in splits.items()}
    result = {"epoch": state["epoch"], "loss": config.loss, "pooling": model.pooling,
              "alignment": alignment(z["test"], labels["test"]), "uniformity": uniformity(z["test"]),
              "knn_accuracy": knn_accuracy(z["train"], labels["train"], z["test"], labels["test"], k=10)}
    print(f"after {result['epoch']} contrastive epochs ({result['loss']}): alignment {result['alignment']:.4f} "
          f"uniformity {result['uniformity']:.4f} 10-NN accuracy {result['knn_accuracy']:.4f}")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
