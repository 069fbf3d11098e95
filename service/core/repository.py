"""A model repository on disk: ``ROOT/<name>/<version>/model.onnx``, and which versions to serve.

The layout is Triton's: one folder per model, one numbered folder per version (a positive
integer), the ONNX file inside (``model.onnx``, with its ``model.onnx.data`` external weights and
optional ``model.onnx.json`` sidecar beside it). An optional ``ROOT/<name>/config.json`` picks the
versions to serve with Triton's ``version_policy``::

    {"version_policy": {"latest": {"num_versions": 2}}}   # the newest N (default: 1)
    {"version_policy": {"all": {}}}                        # every version present
    {"version_policy": {"specific": {"versions": [1, 3]}}} # exactly these

A single ONNX file (``VITSERVE_MODEL``) is a repository of one model with one version, 1.
Everything here only reads the file system: loading is service/serving/registry.py's job.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("vitserve.repository")

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
# Names travel in URLs and metric labels: keep them to a safe, bounded alphabet.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(ValueError):
    """The repository (or one model in it) is laid out or configured wrongly; the message names where."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served.

    Args:
        kind: ``latest`` (the newest ``num_versions``), ``all``, or ``specific`` (``versions``).
        num_versions: for ``latest``.
        versions: for ``specific``.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among ``available``, ascending."""
        present = sorted(set(available))
        if self.kind == "all":
            return present
        if self.kind == "specific":
            return [v for v in present if v in self.versions]
        return present[-self.num_versions :]


@dataclass(frozen=True)
class ModelVersionSource:
    """One version of one model on disk."""

    name: str
    version: int
    path: Path  # the .onnx file


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository: every version present, and the policy that picks the served ones."""

    name: str
    versions: dict[int, ModelVersionSource]
    policy: VersionPolicy

    def selected(self) -> list[ModelVersionSource]:
        return [self.versions[v] for v in self.policy.select(list(self.versions))]


def version_number(text: str) -> int | None:
    """A version as written in a folder name or URL: ASCII digits, no sign, no leading zero, >= 1.

    str.isdigit alone is not enough: it accepts "²" and other Unicode digits that int() refuses."""
    if not (text.isascii() and text.isdigit()) or text != str(int(text)) or int(text) < 1:
        return None
    return int(text)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RepositoryError(
            f"model name {name!r} is not allowed: use letters, digits, '_', '.' and '-' (at most 128, "
            "starting with a letter or digit)"
        )
    return name


def parse_policy(raw: object, where: str) -> VersionPolicy:
    """Triton's ``version_policy`` object -> VersionPolicy; RepositoryError naming ``where`` if malformed."""
    if raw is None:
        return VersionPolicy()
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RepositoryError(
            f"{where}: version_policy must be one of {{'latest': ...}}, {{'all': {{}}}}, {{'specific': ...}}"
        )
    ((kind, body),) = raw.items()
    if not isinstance(body, dict):
        raise RepositoryError(f"{where}: version_policy.{kind} must be an object")
    if kind == "all":
        return VersionPolicy("all")
    if kind == "latest":
        n = body.get("num_versions", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RepositoryError(f"{where}: version_policy.latest.num_versions must be a positive integer, got {n!r}")
        return VersionPolicy("latest", num_versions=n)
    if kind == "specific":
        versions = body.get("versions")
        if (
            not isinstance(versions, list)
            or not versions
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions)
        ):
            raise RepositoryError(
                f"{where}: version_policy.specific.versions must be a non-empty list of positive integers"
            )
        return VersionPolicy("specific", versions=tuple(sorted(set(versions))))
    raise RepositoryError(f"{where}: unknown version_policy {kind!r}; use latest, all or specific")


def read_policy(model_dir: Path) -> VersionPolicy:
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        return VersionPolicy()
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RepositoryError(f"{config}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise RepositoryError(f"{config}: must be a JSON object")
    unknown = sorted(set(raw) - {"version_policy", "name"})
    if unknown:
        raise RepositoryError(f"{config}: unknown field(s) {', '.join(unknown)}; known: version_policy")
    return parse_policy(raw.get("version_policy"), str(config))


def read_model(model_dir: Path) -> ModelEntry:
    """One model folder: its numbered version folders (others are skipped with a warning) and policy."""
    name = check_name(model_dir.name)
    versions: dict[int, ModelVersionSource] = {}
    for child in sorted(model_dir.iterdir()):
        if not child.is_dir():
            continue
        number = version_number(child.name)
        if number is None:
            log.warning("model %s: folder %s is not a version number; skipped", name, child.name)
            continue
        onnx_file = child / MODEL_FILE
        if not onnx_file.is_file():
            log.warning("model %s: version %s has no %s; skipped", name, child.name, MODEL_FILE)
            continue
        versions[number] = ModelVersionSource(name, number, onnx_file)
    return ModelEntry(name, versions, read_policy(model_dir))


def scan_repository(root: Path) -> dict[str, ModelEntry]:
    """Every model under ``root`` (a folder per model); RepositoryError if ``root`` is not a folder."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    models = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            models[child.name] = read_model(child)
    return models


def single_file_repository(path: Path, name: str) -> dict[str, ModelEntry]:
    """``VITSERVE_MODEL=file.onnx`` as a repository: one model, version 1."""
    check_name(name)
    return {name: ModelEntry(name, {1: ModelVersionSource(name, 1, path)}, VersionPolicy("all"))}
