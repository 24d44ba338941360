"""The `dsv2` command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="print a config and its parameter counts")
    info.add_argument("config", help="preset (tiny, v2-lite, v2) or config.json path")
    info.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.cmd == "info":
        return _info(args)
    return 2


def _info(args) -> int:
    from dsv2_jax.config import load_config
    from dsv2_jax.params import count_params

    cfg = load_config(args.config).with_overrides(args.set)
    total, active = count_params(cfg)
    print(f"{args.config}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})")
    print(f"total parameters:  {total:,} ({total / 1e9:.2f}B)")
    print(f"active per token:  {active:,} ({active / 1e9:.2f}B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
