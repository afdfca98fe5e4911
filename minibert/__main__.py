"""python -m minibert data: put MASSIVE en-US in place (from MASSIVE_JSONL or the official tarball).
python -m minibert weights [MODEL] [--compact DIR]: fetch and verify pretrained weights.
python -m minibert export RUN FOLDER: write a trained run as a folder transformers' BertModel loads.
python -m minibert walkthrough SENTENCE [--label alarm]: one sentence through one training step, printed."""

import sys

from .cli import Parser
from .data import SCENARIOS, fetch_massive
from .export import export_run
from .fetch import DownloadError
from .runs import check_out
from .walkthrough import walkthrough
from .weights import resolve, write_compact


def main(argv=None):
    p = Parser(prog="python -m minibert",
               description="Fetch the data or pretrained weights, export a trained run, or walk through one "
                           "training step.")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("data", help="put MASSIVE en-US in place, checked by sha256")
    weights = commands.add_parser("weights", help="fetch and verify pretrained weights")
    weights.add_argument("model", nargs="?", default="auto", help="auto, a model name, or a folder")
    weights.add_argument("--compact", metavar="DIR", help="also write an fp16 copy of the model folder to DIR")
    export = commands.add_parser("export", help="write a run as a folder transformers' BertModel loads")
    export.add_argument("run", metavar="RUN", help="a run folder written by train.py")
    export.add_argument("folder", metavar="FOLDER", help="a new or empty folder to write to")
    walk = commands.add_parser("walkthrough", help="print what one training step of the paper's baseline does to "
                                                   "a sentence, file by file")
    walk.add_argument("sentence", help='a sentence, say "wake me up at seven"')
    walk.add_argument("--label", choices=SCENARIOS, default="alarm", metavar="SCENARIO",
                      help=f"its scenario, one of MASSIVE's {len(SCENARIOS)}: {', '.join(SCENARIOS)} (default: alarm)")
    walk.add_argument("--model", default="all-MiniLM-L6-v2", help="a model name or a folder (default: %(default)s)")
    walk.add_argument("--seed", type=int, default=0, help="the head's weights and the dropout (default: 0)")
    args = p.parse_args(argv)
    try:
        if args.command == "data":
            print(fetch_massive())
        elif args.command == "weights":
            if args.compact:  # before anything is fetched
                check_out(args.compact, "pass --compact a new or empty folder")
            print(resolve(args.model)[1])
            if args.compact:
                print(write_compact(args.model, args.compact))
        elif args.command == "export":
            print(export_run(args.run, args.folder))
        else:
            walkthrough(args.sentence, args.label, args.model, args.seed)
    except (DownloadError, ValueError) as e:
        sys.exit(f"minibert: {e}")
    except OSError as e:  # a folder that cannot be listed or written
        sys.exit(f"minibert: {e.filename}: {e.strerror}")


if __name__ == "__main__":
    main()
