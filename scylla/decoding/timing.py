"""Wall-clock split of a decoding call into draft / verify / other, device-synchronised.

On an accelerator kernels run asynchronously, so every section boundary waits for the device;
on the CPU that wait is a no-op and a section costs two ``perf_counter`` calls.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Seconds per timed section (draft, verify); everything else of the call is "other"."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spent = {"draft": 0.0, "verify": 0.0}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, section: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.spent[section] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        synchronize(self.device)
        total = time.perf_counter() - self.start
        timed = self.spent["draft"] + self.spent["verify"]
        return {"draft": self.spent["draft"], "verify": self.spent["verify"],
                "other": max(0.0, total - timed), "total": total}
