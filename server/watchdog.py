"""Ends a process's descendants when the process dies, even by kill -9.

Ray's simulation engine starts agent processes (raylet, GCS, workers) that outlive a driver
killed with SIGKILL, which runs no clean-up. A watchdog started beside the driver notes the
driver's descendants every second (from /proc; Linux) and, once the driver is gone, kills
the last ones it saw. Elsewhere it does nothing.

    python -m server.watchdog PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the fields follow the last ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = children_by_parent(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return (PROC / str(pid)).exists()


def watch(pid: int, interval: float = 1.0) -> None:
    seen: set[int] = set()
    while alive(pid) and os.getppid() == pid:
        seen = descendants(pid)
        time.sleep(interval)
    for child in seen:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_for_this_process() -> subprocess.Popen | None:
    """A watchdog for the current process (None where /proc is missing)."""
    if not PROC.is_dir():
        return None
    return subprocess.Popen([sys.executable, "-m", "gankit.server.watchdog", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parents[1]))


if __name__ == "__main__":
    watch(int(sys.argv[1]))
