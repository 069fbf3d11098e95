"""What the /v1/jobs routes need from the job runner: ``JobsControl``.

In one process that is ``JobRunner`` itself. In a multi-process server the runner lives in the
engine process (so it runs exactly once) and each front-end worker has a ``RemoteJobs``
(service/serving/engine_client.py): the same database, with ``notify`` and ``cancel`` sent to the
engine process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from service.scoring.job_store import JobRecord, JobStore


class JobsControl(Protocol):
    @property
    def db_path(self) -> Path: ...

    @property
    def store(self) -> JobStore: ...

    def notify(self) -> None:
        """A job was submitted."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop scoring ``job_id`` (the store already says cancelled)."""
        ...

    def images_per_second(self, job: JobRecord) -> float | None: ...

    @property
    def paused(self) -> dict[str, str]:
        """Job id -> why it waits (storage full), while it does."""
        ...

    async def stop(self) -> None: ...
