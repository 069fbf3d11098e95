"""The `vitserve` command: one CLI, one subcommand per module.

Each module listed in COMMAND_MODULES exposes ``add_parser(subparsers)``, which registers its
subcommand and sets ``func`` (taking the parsed args, returning an exit code). Modules must be
cheap to import: heavy imports (torch, onnxruntime) happen inside ``func``, so `vitserve serve`
works in an image without torch and `vitserve --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Service-side commands first; model-side ones (they need the `model` extra: torch) after.
COMMAND_MODULES: tuple[str, ...] = (
    "service.cli.serve",
    "service.cli.score",
    "service.cli.inspect",
    "model.commands.export",
    "model.commands.finetune",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitserve", description="Serve Vision Transformer image classifiers with ONNX Runtime."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that command is not part of this installation
            raise
        module.add_parser(subparsers)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of ``parser`` (as build_parser made it)."""
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The subcommand's own usage, not the top-level one: `vitserve serve --bad` shows serve's flags.
        subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "torchvision", "onnx", "onnxscript", "safetensors", "timm", "transformers"):
            print(
                f"vitserve {args.command}: needs {exc.name}; install the model extra: pip install 'vitserve[model]'",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as exc:
        # Bad input a command did not name itself (an unreadable path, a malformed value): one line,
        # never a traceback. Each command names its own errors first; this is the net under them.
        print(f"vitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
