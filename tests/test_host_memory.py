"""The console command's re-run under glibc's huge-page malloc (`dsv2_jax.host_memory`)."""

import os
import subprocess
import sys

import pytest

from dsv2_jax import cli, host_memory
from dsv2_jax.host_memory import TUNABLE, huge_page_env


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
    assert "DSV2_HUGE_PAGES ignored: the kernel's transparent huge pages are never" in capsys.readouterr().err
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
    code = ("import os, sys; from dsv2_jax.host_memory import reexec_with_huge_pages; "
            "print('run', os.getpid(), flush=True); reexec_with_huge_pages('train'); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["DSV2_HUGE_PAGES"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    runs = [line for line in out if line.startswith("run ")]
    assert len(runs) == 2 and runs[0] == runs[1]  # ran twice, the same pid: replaced, not spawned
    assert f"tunables {TUNABLE}=1" in out
