"""python -m minibert weights [MODEL] [--compact DIR]: fetch and verify pretrained weights.
python -m minibert export RUN FOLDER: write a trained run as a folder transformers' BertModel loads."""

import sys

from .cli import Parser
from .export import export_run
from .fetch import DownloadError
from .weights import resolve, write_compact


def main(argv=None):
    p = Parser(prog="python -m minibert", description="Fetch pretrained weights, or export a trained run.")
    commands = p.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="fetch and verify pretrained weights")
    weights.add_argument("model", nargs="?", default="auto", help="auto, a model name, or a folder")
    weights.add_argument("--compact", metavar="DIR", help="also write an fp16 copy of the model folder to DIR")
    export = commands.add_parser("export", help="write a run as a folder transformers' BertModel loads")
    export.add_argument("run", metavar="RUN", help="a run folder written by train.py")
    export.add_argument("folder", metavar="FOLDER", help="a new or empty folder to write to")
    args = p.parse_args(argv)
    try:
        if args.command == "weights":
            print(resolve(args.model)[1])
            if args.compact:
                print(write_compact(args.model, args.compact))
        else:
            print(export_run(args.run, args.folder))
    except (DownloadError, ValueError) as e:
        sys.exit(f"minibert: {e}")
    except OSError as e:  # a folder that cannot be listed or written
        sys.exit(f"minibert: {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
