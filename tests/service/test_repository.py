"""The model repository on disk, the registry of loaded versions, and the response cache (no server)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from service.core.errors import NotFound, NotReady
from service.core.metadata import GOLDEN_KEY
from service.core.repository import (
    RepositoryError,
    VersionPolicy,
    parse_policy,
    scan_repository,
    single_file_repository,
    version_number,
)
from service.core.settings import Settings
from service.runtime.metrics import Metrics
from service.serving.cache import ResponseCache
from service.serving.registry import ModelNotLoadable, ModelRegistry, UnloadRefused, VersionState


def make_repository(root: Path, layout: dict[str, list[int]], policies: dict[str, dict] | None = None) -> Path:
    for name, versions in layout.items():
        for version in versions:
            folder = root / name / str(version)
            folder.mkdir(parents=True)
            (folder / "model.onnx").write_bytes(b"onnx " + f"{name}/{version}".encode())
        if policies and name in policies:
            (root / name / "config.json").write_text(json.dumps({"version_policy": policies[name]}))
    return root


def test_scan_reads_models_versions_and_policies(tmp_path):
    root = make_repository(
        tmp_path,
        {"a": [1, 2, 3], "b": [1, 4], "c": [2, 5, 7]},
        {"b": {"all": {}}, "c": {"specific": {"versions": [2, 7]}}},
    )
    (root / "a" / "notes").mkdir()  # not a version number: skipped
    (root / "a" / "9").mkdir()  # a version folder without model.onnx: skipped
    for odd in ("\u00b2", "007", "0"):  # a Unicode digit, a leading zero, zero: not versions
        (root / "a" / odd).mkdir()
        (root / "a" / odd / "model.onnx").write_bytes((root / "a" / "1" / "model.onnx").read_bytes())
    models = scan_repository(root)
    assert sorted(models) == ["a", "b", "c"]
    assert sorted(models["a"].versions) == [1, 2, 3]
    assert [s.version for s in models["a"].selected()] == [3]  # default policy: the latest one
    assert [s.version for s in models["b"].selected()] == [1, 4]
    assert [s.version for s in models["c"].selected()] == [2, 7]
    assert models["a"].versions[2].path == root / "a" / "2" / "model.onnx"


@pytest.mark.parametrize(
    ("text", "number"), [("1", 1), ("42", 42), ("0", None), ("01", None), ("-1", None), ("\u00b2", None), ("", None)]
)
def test_version_numbers_are_ascii_positive_integers(text, number):
    assert version_number(text) == number


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"latest": {"num_versions": 0}}, "positive integer"),
        ({"specific": {"versions": []}}, "non-empty list"),
        ({"specific": {"versions": [1, "2"]}}, "non-empty list"),
        ({"newest": {}}, "unknown version_policy"),
        ({"latest": {}, "all": {}}, "one of"),
        ([1], "one of"),
    ],
)
def test_malformed_policies_are_named(raw, message):
    with pytest.raises(RepositoryError, match=message):
        parse_policy(raw, "m/config.json")


def test_latest_policy_and_config_errors(tmp_path):
    assert VersionPolicy("latest", num_versions=2).select([5, 1, 3]) == [3, 5]
    root = make_repository(tmp_path, {"m": [1]})
    (root / "m" / "config.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="not readable JSON"):
        scan_repository(root)
    (root / "m" / "config.json").write_text(json.dumps({"version_polcy": {"all": {}}}))
    with pytest.raises(RepositoryError, match="unknown field"):
        scan_repository(root)
    with pytest.raises(RepositoryError, match="not a directory"):
        scan_repository(tmp_path / "missing")
    with pytest.raises(RepositoryError, match="not allowed"):
        single_file_repository(tmp_path / "x.onnx", "bad name/with slash")


def test_cache_is_a_bounded_lru_that_never_crosses_versions():
    events = []
    cache = ResponseCache(2, on_event=events.append)
    cache.put(("m", 1, "aa", 5), ["first"])
    cache.put(("m", 1, "bb", 5), ["second"])
    assert cache.get(("m", 1, "aa", 5)) == ["first"]  # now most recent
    assert cache.get(("m", 2, "aa", 5)) is None  # another version: a miss
    cache.put(("m", 1, "cc", 5), ["third"])  # evicts "bb", the least recently used
    assert cache.get(("m", 1, "bb", 5)) is None
    assert len(cache) == 2 and cache.counters.evictions == 1
    assert (cache.counters.hits, cache.counters.misses) == (1, 2)
    assert events.count("hit") == 1 and events.count("eviction") == 1
    cache.drop_version("m", 1)
    assert len(cache) == 0
    off = ResponseCache(0)
    off.put(("m", 1, "aa", 5), ["x"])
    assert off.get(("m", 1, "aa", 5)) is None and len(off) == 0


class LabelledEngine:
    """A fake engine per version: class ``winner`` always wins (or NaN logits), with optional run delay."""

    def __init__(self, make_fake_engine, winner: int, *, nan: bool = False, golden: list | None = None, delay_s=0.0):
        self.inner = make_fake_engine(delay_s=delay_s)
        self.metadata = self.inner.metadata
        if golden is not None:
            self.metadata.extra[GOLDEN_KEY] = json.dumps(golden)
        self.on_gpu, self.max_batch_size = False, None
        self.winner, self.nan = winner, nan

    def run(self, batch):
        logits = self.inner.run(batch) * 0
        logits[:, self.winner] = 1.0
        return logits * np.nan if self.nan else logits

    def warmup(self, sizes):
        return self.inner.warmup(sizes)

    def describe(self):
        return {}


def registry_with(engines: dict[tuple[str, int], object], **settings) -> ModelRegistry:
    def factory(source):
        engine = engines[(source.name, source.version)]
        if isinstance(engine, Exception):
            raise engine
        return engine

    return ModelRegistry(Settings(**settings), Metrics(), factory)


def pixels() -> np.ndarray:
    return np.zeros((3, 32, 32), np.float32)


def run(coro):
    return asyncio.run(coro)


def test_a_new_version_takes_traffic_only_when_ready_and_the_old_one_finishes_its_leases(tmp_path, make_fake_engine):
    root = make_repository(tmp_path, {"m": [1]})
    engines = {("m", 1): LabelledEngine(make_fake_engine, 1), ("m", 2): LabelledEngine(make_fake_engine, 2)}
    registry = registry_with(engines)

    async def scenario():
        await registry.apply(scan_repository(root), golden=False)
        assert registry.current == {"m": 1}
        async with registry.lease("m") as held:  # a request in flight on version 1
            make_repository(root, {"m": [2]})
            await registry.apply(scan_repository(root))
            assert registry.current == {"m": 2}  # new traffic goes to version 2 ...
            assert held.version == 1 and held.state is VersionState.UNLOADING
            logits = await held.batcher.submit(pixels())  # ... while the old request finishes on 1
            assert int(logits.argmax()) == 1
        for _ in range(200):
            if ("m", 1) not in registry.lanes:
                break
            await asyncio.sleep(0.01)
        assert ("m", 1) not in registry.lanes  # unloaded once its lease was returned
        lane = registry.resolve("m")
        assert int((await lane.batcher.submit(pixels())).argmax()) == 2
        await registry.close()

    run(scenario())


@pytest.mark.parametrize("broken", ["raises", "nan", "golden"])
def test_a_broken_version_never_takes_traffic(tmp_path, make_fake_engine, broken):
    root = make_repository(tmp_path, {"m": [1]})
    golden_png = (Path(__file__).parents[2] / "service" / "serving" / "golden_images" / "coffee.jpg").read_bytes()
    bad = {
        "raises": ValueError("input 'x' has 2 dimensions, expected 4"),
        "nan": LabelledEngine(make_fake_engine, 2, nan=True),
        "golden": LabelledEngine(
            make_fake_engine, 2, golden=[{"name": "coffee", "image": base64.b64encode(golden_png).decode(), "top1": 7}]
        ),
    }[broken]
    registry = registry_with({("m", 1): LabelledEngine(make_fake_engine, 1), ("m", 2): bad})

    async def scenario():
        await registry.apply(scan_repository(root), golden=False)
        make_repository(root, {"m": [2]})
        await registry.apply(scan_repository(root))
        assert registry.current == {"m": 1}
        assert int((await registry.resolve("m").batcher.submit(pixels())).argmax()) == 1  # the old one answers
        status = {(s.name, s.version): s for s in registry.statuses()}
        assert status[("m", 2)].state is VersionState.UNAVAILABLE
        expected = {"raises": "2 dimensions", "nan": "non-finite", "golden": "expected 7"}[broken]
        assert expected in status[("m", 2)].reason
        with pytest.raises(NotFound, match="unknown version '2'"):
            registry.resolve("m", 2)
        assert registry.metrics.model_load_failures.labels("m")._value.get() == 1
        await registry.close()

    run(scenario())


def test_unload_is_refused_while_in_use_unless_forced_and_load_retries(tmp_path, make_fake_engine):
    root = make_repository(tmp_path, {"m": [1]})
    registry = registry_with({("m", 1): LabelledEngine(make_fake_engine, 1)})

    async def scenario():
        await registry.apply(scan_repository(root), golden=False)
        async with registry.lease("m"):
            with pytest.raises(UnloadRefused, match="in flight"):
                await registry.unload("m")
        await registry.unload("m")
        with pytest.raises(NotFound, match="unknown model"):
            registry.resolve("m")
        await registry.load("m", scan_repository(root))
        assert registry.current == {"m": 1}
        with pytest.raises(NotFound, match="not in the repository"):
            await registry.load("other", scan_repository(root))
        await registry.close()

    run(scenario())


def test_a_version_over_the_memory_budget_is_refused_with_a_clear_message(tmp_path, make_fake_engine):
    root = make_repository(tmp_path, {"m": [1], "n": [1]})
    engines = {("m", 1): LabelledEngine(make_fake_engine, 1), ("n", 1): LabelledEngine(make_fake_engine, 2)}
    size = (root / "m" / "1" / "model.onnx").stat().st_size
    registry = registry_with(engines, model_memory_budget_bytes=size + 1)

    async def scenario():
        await registry.apply(scan_repository(root), golden=False)
        assert list(registry.current) == ["m"]  # "m" fitted, "n" did not
        failure = {(s.name, s.version): s.reason for s in registry.statuses()}[("n", 1)]
        assert "budget" in failure and "model_memory_budget_bytes" in failure
        with pytest.raises(ModelNotLoadable, match="budget"):
            await registry.load("n", scan_repository(root))
        with pytest.raises(NotReady):
            registry.resolve("n")
        await registry.close()

    run(scenario())
