"""The `dsv2` command. Each subcommand lives beside the code it drives and registers itself
through an `add_cli(subparsers)` function that sets `func` on its parser."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules contributing subcommands, in --help order.
_COMMAND_MODULES = (
    "dsv2_jax.cli_info",
    "dsv2_jax.train.cli",
    "dsv2_jax.checkpoint.convert",
    "dsv2_jax.cli_generate",
    "dsv2_jax.cli_plan",
    "dsv2_jax.benchmark",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option that has a default and does not already say
    what its default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or action.default in (None, argparse.SUPPRESS)
                or action.default == [] or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.add_cli(sub)
    return p


def main(argv=None) -> int:
    from dsv2_jax.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, OSError) as e:
        # Bad input (configs, data specs, checkpoints, flags) and the file system's refusals
        # (a directory where a file belongs, permissions, a full disk): one line, no
        # traceback, unless DSV2_DEBUG asks for it.
        if os.environ.get("DSV2_DEBUG"):
            raise
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the backend's out-of-memory, in one line with what would help
        if "RESOURCE_EXHAUSTED" not in str(e) or os.environ.get("DSV2_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0][:300]
        print(f"dsv2: error: out of memory ({first}); try a smaller --batch-size or --seq-len, "
              f"more devices (--mesh fsdp=N), --set remat=full, or size the step with `dsv2 plan`",
              file=sys.stderr)
        return 1


def console() -> int:
    """The `dsv2` console command: `main` on sys.argv, first re-run, for the commands that
    compute, under the allocator DSV2_MALLOC names and glibc's huge-page malloc when
    DSV2_HUGE_PAGES=1 (`dsv2_jax.host_memory`; not from `main`, which tests and scripts call
    in-process)."""
    from dsv2_jax.host_memory import reexec_for_host_memory

    reexec_for_host_memory(next((a for a in sys.argv[1:] if not a.startswith("-")), None))
    return main()


if __name__ == "__main__":
    sys.exit(console())
