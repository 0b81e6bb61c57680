"""Which process owns an MLflow run, and is it still alive?

A run is tagged ``scylla.owner`` = ``host:pid:start ticks`` by the process that opens it. A
run left RUNNING (the process was SIGKILLed, the machine went down) can then be told apart
from one still at work: ``scylla.pipeline.reuse`` closes a sweep's dead attempts with it, and
``scylla.pipeline.tracking`` the runs a stage run by hand left behind.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

OWNER_TAG = "scylla.owner"


def start_ticks(pid: int) -> str | None:
    """Process start time in clock ticks since boot, which tells a reused pid apart;
    "?" where there is no /proc (then only the pid is checked); None: no such process."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return None
    return fields[19]  # field 22 of proc(5), counted from field 3 (after "comm")


def owner_id(pid: int | None = None) -> str:
    """This process's owner string (or process ``pid``'s)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{start_ticks(pid)}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it lives on another host."""
    host, pid, ticks = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    return start_ticks(int(pid)) == ticks
