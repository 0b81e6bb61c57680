"""The machine a run measures on, as one line: CPU, cores, torch build and its threads.

Recorded as the ``machine`` tag of every stage run (``scylla.pipeline.reuse``) and in every
benchmark report (``scylla bench``), so a figure or verdict can say where its numbers come from.
"""
from __future__ import annotations

import os
import platform


def description() -> str:
    import torch

    from scylla.modeling.kernels import cpu_model

    gpu = (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    return (f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores{gpu}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")
