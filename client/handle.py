"""The fate of one ``snapshot()`` call: copied, sealed, failed, skipped or given up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SnapshotHandle:
    """The fate of one ``snapshot()`` call."""

    step: int
    skipped: bool = False
    error: BaseException | None = None
    restorable_step: int | None = None
    _copied: threading.Event = field(default_factory=threading.Event, repr=False)
    _sealed: threading.Event = field(default_factory=threading.Event, repr=False)
    _cuda_event: Any = field(default=None, repr=False)
    # When the copy was sealed; a step pending protection far past this is given up.
    _sealed_at: float = field(default=0.0, repr=False)
    _given_up: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.skipped:
            self._copied.set()
            self._sealed.set()

    def done(self) -> bool:
        """True once the snapshot is sealed (or failed, or was skipped)."""
        return self._sealed.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until sealed; re-raises the error of a failed snapshot."""
        if not self._sealed.wait(timeout):
            raise TimeoutError(f"snapshot of step {self.step} not sealed within {timeout}s")
        if self.error is not None:
            raise self.error

    def wait_copied(self) -> None:
        self._copied.wait()

    def wait_done(self) -> None:
        """Block until sealed, failed or skipped; never raises."""
        self._sealed.wait()

    def fence(self) -> None:
        """Return once the snapshotted state may change: its host copies are done, and the
        current CUDA stream waits for its device copies (on the GPU: the host does not)."""
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)
        self._copied.wait()

    # ------------------------------------------------- the copy engine's side

    def copying_on_gpu(self, event: Any) -> None:
        """Device copies were queued; ``event`` marks them done."""
        self._cuda_event = event

    def copied(self) -> None:
        """Host copies done: the optimizer may go on (device copies it waits for on the
        GPU, through the event); then the copy thread waits for the device copies."""
        self._copied.set()
        if self._cuda_event is not None:
            self._cuda_event.synchronize()

    def sealed(self) -> None:
        self._sealed_at = time.monotonic()
        self._sealed.set()

    def fail(self, exc: BaseException) -> None:
        """Never sealed: whoever waits for it (the next snapshot, ``close()``) goes on."""
        self.error = exc
        self._copied.set()
        self._sealed.set()

    # ------------------------------------------------ the agreement's side

    @property
    def settled(self) -> bool:
        """Failed or given up: nothing more will come of it, a new snapshot may be taken."""
        return self.error is not None or self._given_up

    def pending_for(self) -> float:
        """Seconds since it was sealed (and not yet restorable)."""
        return time.monotonic() - self._sealed_at

    def give_up(self) -> None:
        self._given_up = True
