"""Peak resident memory of this process, for benchmarks that measure a child process.

``getrusage(RUSAGE_SELF).ru_maxrss`` carries over the peak of the process that forked it: a child
started by a parent holding a large dataset would report the parent's memory. ``VmHWM`` in
``/proc/self/status`` is the peak of this process's own address space since it started (exec)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent's
