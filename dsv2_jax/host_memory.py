"""Host memory for the `dsv2` commands that compute, on request: the allocator
(`DSV2_MALLOC=tcmalloc`) and transparent huge pages (`DSV2_HUGE_PAGES=1`). The one place
these choices are made.

XLA:CPU allocates a step's temporaries afresh at every step, and glibc's malloc hands blocks
that large to the kernel and back (`mmap` / `munmap`), so each step faults in fresh 4 KiB
pages: the bench config's train step took ~762,000 minor faults, 1.5-1.9 s of system time
per step (docs/training.md, "Host memory on CPU").

- `DSV2_MALLOC=tcmalloc` (or `jemalloc`, or a library's path) preloads that allocator
  (`LD_PRELOAD`). tcmalloc keeps the freed blocks for the next step: a few faults per step,
  the resident size flat, and the bench config's train step ~1.2x faster alone (both
  frameworks of `dsv2 bench` ~1.2-1.35x faster in one process). The library comes from the
  system (`apt install libtcmalloc-minimal4` on Debian / Ubuntu); where none is found the
  command says so in one line and runs as started.
- `DSV2_HUGE_PAGES=1` sets glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35): malloc
  asks for transparent huge pages, ~1,700 faults per step. The kernel may compact memory to
  find a huge page when one is faulted in, and on this machine (transparent huge pages and
  their defrag both `madvise`) that stalled about one call in three of the bench's MoE layer
  (forward + backward) for ~0.45 s of system time.

Neither is the default. The dynamic loader and glibc read these variables once, at process
start, so the console command re-runs itself (same pid, same arguments) with them set,
before anything heavy is imported; settings the user already made (`LD_PRELOAD` naming the
library, `GLIBC_TUNABLES` naming the tunable) are left as they are.
"""

from __future__ import annotations

import ctypes.util
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


def asked(environ, name: str = "DSV2_HUGE_PAGES") -> bool:
    """Whether the variable `name` says yes (1, true, yes, on)."""
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


# The allocators DSV2_MALLOC names, each with the library names to look for, in order.
ALLOCATORS = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
# What DSV2_MALLOC may say to mean "the C library's own malloc": nothing to change.
_LIBC = ("", "glibc", "libc", "default", "system", "0", "off", "no", "none")


def find_allocator(name: str, find=ctypes.util.find_library) -> str | None:
    """The library to preload for DSV2_MALLOC's value `name`: a path as given (when the file
    exists), or the first of ALLOCATORS[name] the dynamic loader finds (its soname), or None."""
    if "/" in name:
        return name if os.path.isfile(name) else None
    for lib in ALLOCATORS.get(name, ()):
        found = find(lib)
        if found:
            return found
    return None


def malloc_env(environ, find=find_allocator) -> tuple[dict | None, str | None]:
    """(the environment to re-run with, or None when nothing is to change; why an asked-for
    allocator cannot be used, or None). DSV2_MALLOC names an allocator of ALLOCATORS or a
    shared library's path; nothing changes when it is unset or names the C library's malloc,
    or when LD_PRELOAD already holds the library (the user's setting, or a re-run's)."""
    name = environ.get("DSV2_MALLOC", "").strip()
    if name.lower() in _LIBC:
        return None, None
    if "/" not in name:
        name = name.lower()
        if name not in ALLOCATORS:
            return None, f"DSV2_MALLOC={name!r}: expected one of {', '.join(ALLOCATORS)}, glibc or a library's path"
    lib = find(name)
    if lib is None:
        where = ("no such file" if "/" in name else
                 f"no lib{ALLOCATORS[name][0]} found (Debian / Ubuntu: apt install "
                 f"{'libtcmalloc-minimal4' if name == 'tcmalloc' else 'libjemalloc2'})")
        return None, f"DSV2_MALLOC={name}: {where}"
    current = environ.get("LD_PRELOAD", "")
    if lib in current.replace(":", " ").split():
        return None, None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{lib}:{current}" if current else lib
    return env, None


def host_env(environ) -> tuple[dict | None, list[str]]:
    """(the environment the command should re-run with, or None; one line per asked-for
    setting that cannot apply): `malloc_env` and `huge_page_env` together, so that the command
    re-runs at most once."""
    notes = []
    value = environ.get("DSV2_HUGE_PAGES", "").strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        notes.append(f"DSV2_HUGE_PAGES={environ['DSV2_HUGE_PAGES']!r} not understood (1/0, "
                     f"true/false, yes/no, on/off): off")
    m_env, why = malloc_env(environ)
    if why:
        notes.append(why)
    h_env, why = huge_page_env(m_env or environ, glibc_version(), thp_mode())
    if why:
        notes.append(f"DSV2_HUGE_PAGES ignored: {why}")
    return h_env or m_env, notes


def reexec_for_host_memory(command: str | None) -> None:
    """For a subcommand in COMMANDS, replaces this process with the same command line under
    the environment `host_env` asks for (DSV2_MALLOC, DSV2_HUGE_PAGES); says in one line each
    why an asked-for setting cannot apply; returns when nothing is to change. Call it only
    from the console entry point: it re-runs `sys.orig_argv`."""
    if command not in COMMANDS:
        return
    env, notes = host_env(os.environ)
    for note in notes:
        print(f"dsv2: {note}", file=sys.stderr)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
