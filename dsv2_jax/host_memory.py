"""Host memory in transparent huge pages for the `dsv2` commands that compute, on request
(`DSV2_HUGE_PAGES=1`): the one place this choice is made.

XLA:CPU allocates a step's temporaries afresh at every step, and glibc's malloc hands blocks
that large to the kernel and back (`mmap` / `munmap`), so each step faults in fresh 4 KiB
pages: the bench config's train step took ~762,000 minor faults, 1.5-1.9 s of system time
per step. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) makes malloc ask for
transparent huge pages, ~1,700 faults per step (docs/training.md, "Host memory on CPU").
glibc reads tunables once, at process start, so with `DSV2_HUGE_PAGES=1` the console
command re-runs itself (same pid, same arguments) with the tunable added, before anything
heavy is imported; a `GLIBC_TUNABLES` that already names the tunable is left as it is.

Not the default: the kernel may compact memory to find a huge page when one is faulted in,
and on this machine (transparent huge pages and their defrag both `madvise`) that stalled
about one call in three of the bench's MoE layer (forward + backward) for ~0.45 s of system
time (2.05x the dense layer in one bench run against 1.22x without); the train step gains
on average (docs/training.md, "Host memory on CPU").
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
# Subcommands whose work runs on the host's memory (training, evaluation, generation, the
# bench); the others (info, plan, convert) read files and print.
COMMANDS = ("train", "eval", "generate", "bench")
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None (another libc, another OS)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION").split()[1]  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, IndexError, ValueError, OSError):
        return None


def thp_mode(path: str = _THP) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def asked(environ) -> bool:
    """Whether DSV2_HUGE_PAGES asks for huge pages (1, true, yes, on)."""
    return environ.get("DSV2_HUGE_PAGES", "").strip().lower() in ("1", "true", "yes", "on")


def huge_page_env(environ, glibc: tuple[int, int] | None, thp: str | None) -> tuple[dict | None, str | None]:
    """(the environment to re-run with, or None when nothing is to change; why an asked-for
    re-run cannot help, or None). Nothing changes when not asked for (`asked`), when
    GLIBC_TUNABLES already names the tunable (the user's choice), with a glibc without it
    (< 2.35), or with transparent huge pages off ("never") or absent."""
    if not asked(environ):
        return None, None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None, None
    if glibc is None or glibc < (2, 35):
        found = "not glibc" if glibc is None else f"glibc {glibc[0]}.{glibc[1]}"
        return None, f"{TUNABLE} needs glibc 2.35 or newer ({found} here)"
    if thp not in ("always", "madvise"):
        return None, f"the kernel's transparent huge pages are {thp or 'absent'} ({_THP})"
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return env, None


def reexec_with_huge_pages(command: str | None) -> None:
    """For a subcommand in COMMANDS, replaces this process with the same command line under
    the huge-page tunable when `huge_page_env` says so (DSV2_HUGE_PAGES=1); says in one line
    why not when asked for and impossible; returns otherwise. Call it only from the console
    entry point: it re-runs `sys.orig_argv`."""
    if command not in COMMANDS:
        return
    env, why_not = huge_page_env(os.environ, glibc_version(), thp_mode())
    if why_not:
        print(f"dsv2: DSV2_HUGE_PAGES ignored: {why_not}", file=sys.stderr)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
