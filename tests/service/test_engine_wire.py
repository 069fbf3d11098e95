"""The pieces between a front-end worker and the engine process, without processes: the shared-memory
ring (what one side writes the other reads), the frames (every
message survives a byte stream cut anywhere), errors rebuilt with their class and Retry-After."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.core.errors import NotFound, Overloaded
from service.serving import engine_wire as wire
from service.serving.shm_ring import ShmRing, SlotPool


def test_a_second_mapping_of_the_ring_sees_what_the_first_wrote():
    owner = ShmRing(4, 3 * 8 * 8)
    other = ShmRing(4, 3 * 8 * 8, fd=os.dup(owner.fd))  # as the engine maps the descriptor it was sent
    image = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    owner.view(2, (3, 8, 8))[...] = image
    assert np.array_equal(other.view(2, (3, 8, 8)), image)
    owner.view(3, (3, 4, 4))[...] = 1.0  # a smaller input fits a slot too
    assert np.all(other.view(3, (3, 4, 4)) == 1.0)
    with pytest.raises(ValueError):
        owner.view(0, (3, 16, 16))  # larger than a slot
    owner.close()
    other.close()


def test_slots_are_reused_last_freed_first():
    pool = SlotPool(3)
    assert [pool.take(), pool.take(), pool.take(), pool.take()] == [0, 1, 2, None]
    pool.give_back(1)
    pool.give_back(0)
    assert pool.take() == 0 and pool.free == 1


def test_frames_survive_a_stream_cut_anywhere():
    logits = np.arange(10, dtype=np.float32)
    stream = (
        wire.submit(7, 3, wire.ONLINE_LANE, 123.5, "vit", 2)
        + wire.result(7, logits, {"queue_ms": 1.5, "inference_ms": 2.5, "batch_size": 4})
        + wire.error(8, Overloaded("queue full", retry_after_s=3))
        + wire.submit(9, 0, wire.LOW_LANE, None, "", 0)
    )
    for cut in range(1, len(stream)):
        frames: list[bytes] = []
        protocol = wire.FrameProtocol(lambda payload, out=frames: out.append(bytes(payload)), lambda exc: None)
        protocol.data_received(stream[:cut])
        protocol.data_received(stream[cut:])
        assert len(frames) == 4
    first = wire.parse_submit(memoryview(frames[0]))
    assert (first.request_id, first.slot, first.lane, first.deadline, first.model, first.version) == (
        7,
        3,
        wire.ONLINE_LANE,
        123.5,
        "vit",
        2,
    )
    request_id, got, timings = wire.parse_result(memoryview(frames[1]))
    assert request_id == 7 and np.array_equal(got, logits) and timings["batch_size"] == 4
    request_id, error = wire.parse_error(memoryview(frames[2]))
    assert request_id == 8 and isinstance(error, Overloaded) and error.headers["Retry-After"] == "3"
    assert wire.parse_submit(memoryview(frames[3])).deadline is None


def test_an_error_class_is_rebuilt_by_its_code_with_its_status():
    rebuilt = wire.rebuild_error(wire.error_body(NotFound("no model 'x'")))
    assert isinstance(rebuilt, NotFound) and rebuilt.status_code == 404 and rebuilt.message == "no model 'x'"
    unknown = wire.rebuild_error({"code": "model_not_loadable", "status": 400, "message": "bad", "headers": {}})
    assert unknown.status_code == 400 and unknown.code == "model_not_loadable"
