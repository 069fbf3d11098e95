"""A ring of fixed-size slots in shared memory: how pre-processed images reach the engine process.

A front-end worker owns one ring. It copies a pre-processed image into a free slot, sends the
engine the slot's number (a few bytes on a socket), and gets the slot back when the engine answers;
the pixels themselves are never pickled or copied through a pipe. The engine maps the same memory
(the worker hands it the file descriptor over the Unix socket, SCM_RIGHTS) and reads the slot when
it stacks the batch.

The memory is a ``memfd`` (Linux): it has no name, so nothing is left behind in /dev/shm when a
process is killed, and it is not bound by the size of /dev/shm (64 MB in a default Docker
container). Pages are only committed once written; slots are reused last-freed-first, so the
memory a ring really uses follows the peak number of images in flight, not its size.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

PIXEL_DTYPE = np.dtype(np.float32)
_ALIGN = 64  # slots start on cache-line boundaries


def slot_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one slot holding a float32 array of ``shape``, rounded up to the alignment."""
    raw = int(np.prod(shape)) * PIXEL_DTYPE.itemsize
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


class ShmRing:
    """``slots`` float32 arrays of up to ``capacity`` elements each, in one shared mapping.

    Args:
        slots: how many arrays the ring holds.
        capacity: elements per slot (3 x H x W of the largest model input it must carry).
        fd: the memory to map (a descriptor received from the ring's owner); None creates a new memfd.
    """

    def __init__(self, slots: int, capacity: int, fd: int | None = None) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a ring needs at least one slot of one element, got {slots} x {capacity}")
        self.slots = slots
        self.capacity = capacity
        self.slot_bytes = slot_bytes((capacity,))
        size = slots * self.slot_bytes
        if fd is None:
            fd = os.memfd_create("vitserve-ring", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size < size:
            raise ValueError(f"shared memory of {os.fstat(fd).st_size} bytes is smaller than the ring ({size})")
        self.fd = fd
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """The slot as a float32 array of ``shape`` (a view on the shared memory: writes are seen by
        the other process). ValueError when the slot cannot hold that shape or does not exist."""
        count = int(np.prod(shape))
        if not 0 <= slot < self.slots or count > self.capacity:
            raise ValueError(f"slot {slot} of {self.slots} ({self.capacity} elements) cannot hold {shape}")
        return np.frombuffer(self._map, PIXEL_DTYPE, count, offset=slot * self.slot_bytes).reshape(shape)

    def close(self) -> None:
        """Close the descriptor; the mapping goes when the last view of it is garbage."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotPool:
    """Which slots of a ring are free (used from one thread: the worker's event loop).

    Last freed, first reused: a quiet server touches only a few slots' pages.
    """

    def __init__(self, slots: int) -> None:
        self._free = list(range(slots - 1, -1, -1))

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)
