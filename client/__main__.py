"""python -m client: call the Scribe gateway.

  python -m client digit drawing.png              which digit a drawing shows
  python -m client generate "ROMEO:" --stream     Shakespeare, printed as it is written
"""

from __future__ import annotations

import argparse
import os
import sys

from client.scribe_client import DEFAULT_URL, ScribeClient, ScribeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("SCRIBE_API_KEY"),
                        help="for a gateway with API keys on (default: $SCRIBE_API_KEY, which, "
                             "unlike this flag, other users cannot see in the process list)")
    sub = parser.add_subparsers(dest="command", required=True)
    digit = sub.add_parser("digit", help="recognise a drawn digit from an image file")
    digit.add_argument("image", help="PNG, JPEG, ... of one drawn digit")
    digit.add_argument("--version", type=int, help="ask for this model version")
    digit.add_argument("--model", help="a rung of the talk's ladder: bn (default), conv-dropout, conv, "
                       "dense, softmax")
    generate = sub.add_parser("generate", help="continue a prompt in the style of Shakespeare")
    generate.add_argument("prompt")
    generate.add_argument("--max-chars", type=int, default=300)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stream", action="store_true", help="print the text as it is written")
    args = parser.parse_args(argv)

    client = ScribeClient(args.url, api_key=args.api_key)
    if args.command == "generate":
        return run_generate(client, args)
    try:
        result = client.predict_digit(args.image, version=args.version, model=args.model)
    except FileNotFoundError:
        print(f"error: no such file: {args.image}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot read {args.image}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ScribeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result['digit']} (confidence {result['confidence']:.1%}, "
          f"{result['model']['name']} version {result['model']['version']})")
    return 0


def run_generate(client: ScribeClient, args) -> int:
    options = dict(max_chars=args.max_chars, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed)
    try:
        if not args.stream:
            print(args.prompt + client.generate(args.prompt, **options)["text"])
            return 0
        print(args.prompt, end="", flush=True)
        for item in client.generate_stream(args.prompt, **options):
            if isinstance(item, str):
                print(item, end="", flush=True)
        print()
        return 0
    except ScribeError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
