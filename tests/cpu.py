"""CPU accounting for tests that check idle workers sleep."""

from __future__ import annotations

import os
import threading


def other_threads_cpu() -> float:
    """CPU seconds used so far by this process's threads other than the calling one."""
    me, total = threading.get_native_id(), 0.0
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
