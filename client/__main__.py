"""python -m client digit DRAWING [--url URL]: ask the gateway which digit a drawing shows."""

from __future__ import annotations

import argparse
import sys

from client.scribe_client import DEFAULT_URL, ScribeClient, ScribeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    sub = parser.add_subparsers(dest="command", required=True)
    digit = sub.add_parser("digit", help="recognise a drawn digit from an image file")
    digit.add_argument("image", help="PNG, JPEG, ... of one drawn digit")
    digit.add_argument("--version", type=int, help="ask for this model version")
    args = parser.parse_args(argv)

    client = ScribeClient(args.url)
    try:
        result = client.predict_digit(args.image, version=args.version)
    except FileNotFoundError:
        print(f"error: no such file: {args.image}", file=sys.stderr)
        return 2
    except ScribeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result['digit']} (confidence {result['confidence']:.1%}, "
          f"{result['model']['name']} version {result['model']['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
