"""python -m minibert weights [MODEL] [--compact DIR]: fetch and verify pretrained weights."""

import sys

from .cli import Parser
from .fetch import DownloadError
from .weights import resolve, write_compact


def main():
    p = Parser(prog="python -m minibert", description="Fetch and verify pretrained weights.")
    p.add_argument("command", choices=["weights"])
    p.add_argument("model", nargs="?", default="auto", help="auto, a model name, or a folder")
    p.add_argument("--compact", metavar="DIR", help="also write an fp16 copy of the model folder to DIR")
    args = p.parse_args()
    try:
        print(resolve(args.model)[1])
        if args.compact:
            print(write_compact(args.model, args.compact))
    except (DownloadError, ValueError) as e:
        sys.exit(f"minibert: {e}")


main()
