"""`pdcluster` command line: one sub-command per verb.

Each verb lives in its own module, which exposes `register(subparsers)`; the module is imported
lazily so `pdcluster generate` does not pay for Ray and `pdcluster doctor` works without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec import ClusterSpec

# verb -> module (inside this package) that registers it
VERBS: dict[str, str] = {
    "generate": "generate",
    "doctor": "doctor",
    "render": "render",
    "simulate": "simulate",
    "bench": "bench",
    "up": "up",
    "down": "up",
    "status": "up",
}


def load_spec(path) -> ClusterSpec | None:
    """The spec at `path` (the default spec when None); None after printing why it is unusable."""
    from ..spec import ClusterSpec, SpecError
    try:
        return ClusterSpec.from_yaml(path) if path else ClusterSpec.default()
    except (SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for verb, module in VERBS.items():
        if wanted in (None, verb) or wanted not in VERBS:
            importlib.import_module(f".{module}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
