"""The model-description flags (--image-size, --mean, --labels ...) of `score` and `inspect`.

`serve` gets the same flags from its Settings (service/cli/serve.py); the fields and their help
come from one table, service.core.spec.SPEC_FIELDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.core.spec import SPEC_FIELDS, SpecOptions, flag_name, options_from_values

GROUP_TITLE = (
    "model description (for ONNX files without vitserve metadata; a flag overrides the file's metadata "
    "and the <model>.json sidecar)"
)


def add_spec_arguments(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """Add one flag per SPEC_FIELDS entry (``skip``: flags the parser already has)."""
    group = parser.add_argument_group(GROUP_TITLE)
    for name, help_text in SPEC_FIELDS.items():
        if flag_name(name) not in skip:
            group.add_argument(flag_name(name), dest=name, default=None, help=help_text)


def options_from_args(args: argparse.Namespace, *, where: str = "flags") -> SpecOptions:
    """The description the parsed flags give (ModelSpecError names a bad value)."""
    return options_from_values(vars(args), where=where)
