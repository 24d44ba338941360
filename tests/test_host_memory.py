"""The console command's re-run under another allocator or glibc's huge-page malloc
(`dsv2_jax.host_memory`)."""

import os
import subprocess
import sys

import pytest

from dsv2_jax import cli, host_memory
from dsv2_jax.host_memory import TUNABLE, find_allocator, huge_page_env, malloc_env


def test_huge_page_env_adds_the_tunable_only_where_it_can_work():
    base = {"PATH": "/bin", "DSV2_HUGE_PAGES": "1"}
    env, why = huge_page_env(base, (2, 36), "madvise")
    assert env["GLIBC_TUNABLES"] == f"{TUNABLE}=1" and env["PATH"] == "/bin" and why is None
    assert "GLIBC_TUNABLES" not in base  # the caller's mapping is not touched
    other, _ = huge_page_env({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 40), "always")
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert huge_page_env({**base, "DSV2_HUGE_PAGES": " Yes "}, (2, 36), "madvise")[0] is not None
    # Not asked for (the default), or the user's own setting: nothing to change, nothing to say.
    assert huge_page_env({"PATH": "/bin"}, (2, 36), "madvise") == (None, None)
    assert huge_page_env({"DSV2_HUGE_PAGES": "0"}, (2, 36), "madvise") == (None, None)
    assert huge_page_env({**base, "GLIBC_TUNABLES": f"{TUNABLE}=0"}, (2, 36), "madvise") == (None, None)
    # Asked for where it cannot work: nothing to change, and why.
    for glibc, thp, says in [((2, 34), "madvise", "glibc 2.34 here"), (None, "madvise", "not glibc"),
                             ((2, 36), "never", "are never"), ((2, 36), None, "are absent")]:
        env, why = huge_page_env(base, glibc, thp)
        assert env is None and says in why, (glibc, thp, why)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(f)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "absent")) is None


def test_console_reruns_only_the_commands_that_compute(monkeypatch, capsys):
    calls = []

    def fake_exec(path, argv, env):
        calls.append((path, argv, env["GLIBC_TUNABLES"]))
        raise SystemExit(7)

    monkeypatch.setattr(os, "execve", fake_exec)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("DSV2_HUGE_PAGES", "1")
    monkeypatch.setattr(sys, "orig_argv", ["python", "dsv2", "train", "--steps", "1"])
    monkeypatch.setattr(sys, "argv", ["dsv2", "train", "--steps", "1"])
    with pytest.raises(SystemExit) as e:
        cli.console()
    assert e.value.code == 7
    assert calls == [(sys.executable, ["python", "dsv2", "train", "--steps", "1"], f"{TUNABLE}=1")]
    monkeypatch.setattr(sys, "argv", ["dsv2", "plan", "--help"])  # plan reads and prints: no re-run
    with pytest.raises(SystemExit) as e:
        cli.console()
    assert e.value.code == 0 and len(calls) == 1
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "never")  # asked, impossible: one line
    monkeypatch.setattr(sys, "argv", ["dsv2", "train", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.console()
    assert e.value.code == 0 and len(calls) == 1
    assert "dsv2: DSV2_HUGE_PAGES ignored: the kernel's transparent huge pages are never" in capsys.readouterr().err
    monkeypatch.delenv("DSV2_HUGE_PAGES")  # not asked for: train runs as started
    monkeypatch.setattr(sys, "argv", ["dsv2", "train", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.console()
    assert e.value.code == 0 and len(calls) == 1


@pytest.mark.skipif(huge_page_env({"DSV2_HUGE_PAGES": "1"}, host_memory.glibc_version(),
                                  host_memory.thp_mode())[0] is None,
                    reason="this host's glibc or kernel has no huge-page malloc to turn on")
def test_reexec_really_replaces_the_process_with_the_tunable_set():
    """A real exec: the child re-runs its own command line and reports what it ran under."""
    code = ("import os, sys; from dsv2_jax.host_memory import reexec_for_host_memory; "
            "print('run', os.getpid(), flush=True); reexec_for_host_memory('train'); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["DSV2_HUGE_PAGES"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    runs = [line for line in out if line.startswith("run ")]
    assert len(runs) == 2 and runs[0] == runs[1]  # ran twice, the same pid: replaced, not spawned
    assert f"tunables {TUNABLE}=1" in out


def _libm() -> str:
    """A real shared library that is harmless to preload (the C math library)."""
    import ctypes.util

    name = ctypes.util.find_library("m")
    path = next((os.path.join(d, name) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                                 "/lib64", "/usr/lib64", "/lib", "/usr/lib")
                 if name and os.path.isfile(os.path.join(d, name))), None)
    if path is None:
        pytest.skip("no libm file found to preload")
    return path


def test_malloc_env_preloads_the_named_allocator_once(tmp_path):
    found = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": None}
    find = lambda name: found.get(name) if "/" not in name else (name if os.path.isfile(name) else None)
    env, why = malloc_env({"PATH": "/bin", "DSV2_MALLOC": " TCMalloc "}, find)
    assert env == {"PATH": "/bin", "DSV2_MALLOC": " TCMalloc ", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert why is None
    # The user's own preloads are kept, after the allocator; a run that already has it is left alone.
    env, _ = malloc_env({"DSV2_MALLOC": "tcmalloc", "LD_PRELOAD": "/opt/libx.so"}, find)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/opt/libx.so"
    assert malloc_env({"DSV2_MALLOC": "tcmalloc", "LD_PRELOAD": env["LD_PRELOAD"]}, find) == (None, None)
    # Not asked for, or the C library's own malloc: nothing to change, nothing to say.
    for value in (None, "", "glibc", "default", "0"):
        environ = {} if value is None else {"DSV2_MALLOC": value}
        assert malloc_env(environ, find) == (None, None), value
    # A library by path: used when the file exists.
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"")
    assert malloc_env({"DSV2_MALLOC": str(lib)}, find)[0]["LD_PRELOAD"] == str(lib)
    # Asked for and impossible: nothing to change, and why (with how to get it).
    for value, says in [("jemalloc", "apt install libjemalloc2"), ("mimalloc", "expected one of tcmalloc, jemalloc"),
                        (str(tmp_path / "absent.so"), "no such file")]:
        env, why = malloc_env({"DSV2_MALLOC": value}, find)
        assert env is None and says in why, (value, why)


def test_find_allocator_asks_the_loader_in_order(tmp_path):
    seen = []
    assert find_allocator("tcmalloc", lambda n: seen.append(n)) is None
    assert seen == ["tcmalloc_minimal", "tcmalloc"]
    assert find_allocator("tcmalloc", lambda n: "libtcmalloc.so.4" if n == "tcmalloc" else None) == "libtcmalloc.so.4"
    assert find_allocator("nothing", lambda n: "x") is None
    assert find_allocator(str(tmp_path)) is None  # a directory is not a library


def test_reexec_really_preloads_the_allocator():
    """A real exec with a real library preloaded (libm stands in for an allocator: the
    mechanism is the same): the child runs twice, the same pid, LD_PRELOAD set the second
    time; an impossible request is one line on stderr and no re-run."""
    lib = _libm()
    code = ("import os, sys; from dsv2_jax.host_memory import reexec_for_host_memory; "
            "print('run', os.getpid(), flush=True); reexec_for_host_memory('train'); "
            "print('preload', os.environ.get('LD_PRELOAD'))")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DSV2_HUGE_PAGES")}
    env["DSV2_MALLOC"] = lib
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    runs = [line for line in out if line.startswith("run ")]
    assert len(runs) == 2 and runs[0] == runs[1]
    assert f"preload {lib}" in out
    env["DSV2_MALLOC"] = "/nonexistent/libtcmalloc.so"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert len([line for line in res.stdout.split("\n") if line.startswith("run ")]) == 1
    assert "preload None" in res.stdout
    assert res.stderr.strip().endswith("dsv2: DSV2_MALLOC=/nonexistent/libtcmalloc.so: no such file")


def test_a_huge_pages_value_not_understood_is_said():
    from dsv2_jax.host_memory import host_env

    env, notes = host_env({"DSV2_HUGE_PAGES": "maybe"})
    assert env is None and any("DSV2_HUGE_PAGES='maybe' not understood" in n for n in notes)
    assert host_env({"DSV2_HUGE_PAGES": "off"})[1] == []


def test_both_settings_apply_together(monkeypatch, tmp_path):
    """DSV2_MALLOC and DSV2_HUGE_PAGES together: the one re-run carries both the preload and
    the tunable (one dropping the other would silently lose the allocator)."""
    lib = tmp_path / "libmine.so"
    lib.write_bytes(b"")
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    env, notes = host_memory.host_env({"DSV2_MALLOC": str(lib), "DSV2_HUGE_PAGES": "1", "PATH": "/bin"})
    assert notes == []
    assert env["LD_PRELOAD"] == str(lib) and env["GLIBC_TUNABLES"] == f"{TUNABLE}=1" and env["PATH"] == "/bin"
    env, notes = host_memory.host_env({"DSV2_MALLOC": str(lib)})  # one of them alone
    assert env["LD_PRELOAD"] == str(lib) and "GLIBC_TUNABLES" not in env and notes == []


@pytest.mark.parametrize("command,reruns", [("train", True), ("eval", True), ("generate", True),
                                            ("bench", True), ("info", False), ("plan", False),
                                            ("convert", False), (None, False)])
def test_every_command_that_computes_reruns(monkeypatch, command, reruns):
    """The commands whose work runs on the host's memory (train, eval, generate, bench) get
    the asked-for allocator; the ones that read and print start no second process."""
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(env["GLIBC_TUNABLES"]))
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "always")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("DSV2_HUGE_PAGES", "1")
    host_memory.reexec_for_host_memory(command)
    assert calls == ([f"{TUNABLE}=1"] if reruns else [])


def test_huge_pages_from_glibc_2_35_on():
    """glibc 2.35 is the first with the hugetlb tunable: it gets the re-run, 2.34 does not."""
    base = {"DSV2_HUGE_PAGES": "1"}
    assert huge_page_env(base, (2, 35), "always")[0]["GLIBC_TUNABLES"] == f"{TUNABLE}=1"
    assert huge_page_env(base, (3, 0), "always")[0] is not None
    assert huge_page_env(base, (2, 34), "always")[0] is None


def test_every_spelling_the_variables_document_is_understood():
    """DSV2_HUGE_PAGES takes 1/true/yes/on in any case (host_env calls each of them
    understood, so none may quietly mean off); DSV2_MALLOC names the C library's own malloc
    by any of its spellings, in any case, without a note."""
    for yes in ("1", "true", "yes", "on", "ON", " On "):
        assert huge_page_env({"DSV2_HUGE_PAGES": yes}, (2, 36), "madvise")[0] is not None, yes
    for libc in ("glibc", "libc", "default", "system", "0", "off", "no", "none", "None", "GLIBC"):
        assert malloc_env({"DSV2_MALLOC": libc}, lambda name: "libx.so") == (None, None), libc
