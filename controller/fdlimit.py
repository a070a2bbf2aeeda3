"""Raise the open-file soft limit to the hard limit: a site of thousands of devices needs a
socket per device (a listener per device in the simulator), far beyond the usual 1024."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

_NR_OPEN = Path("/proc/sys/fs/nr_open")
_FALLBACK_MAX = 1 << 20  # Linux's default nr_open


def _ceiling(hard: int) -> int:
    """The hard limit, or where it is unlimited, what the kernel lets a process have."""
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        return int(_NR_OPEN.read_text().strip())
    except (OSError, ValueError):
        return _FALLBACK_MAX


def raise_fd_limit(log: logging.Logger) -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; one log line with old and new. Returns
    (old, new) soft limits; a refusal (a container's seccomp, say) is logged, not raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning("file descriptor limit stays %d (hard %d): %s", soft, hard, exc)
            return soft, soft
        log.info("file descriptor limit raised from %d to %d (hard limit)", soft, want)
        return soft, want
    log.info("file descriptor limit %d (hard limit %s)", soft, _text(hard))
    return soft, soft


def _text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


__all__ = ["raise_fd_limit"]
