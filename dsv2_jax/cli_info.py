"""`dsv2 info`: a config and its parameter counts (no weights are built)."""


def add_cli(sub) -> None:
    from dsv2_jax.cli import HelpFormatter

    p = sub.add_parser("info", help="print a config's shape and parameter counts",
                       formatter_class=HelpFormatter)
    p.add_argument("config", help="preset (tiny, bench, v2-lite, v2) or config.json path")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config fields")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv2_jax.config import load_config
    from dsv2_jax.params import count_params, human_count

    cfg = load_config(args.config).with_overrides(args.set)
    total, active = count_params(cfg)
    mlp = (f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})"
           if cfg.n_routed_experts else "dense (no routed experts)")
    print(f"{args.config}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {mlp}")
    print(f"total parameters:  {total:,} ({human_count(total)})")
    print(f"active per token:  {active:,} ({human_count(active)}, input embedding excluded)")
    return 0
