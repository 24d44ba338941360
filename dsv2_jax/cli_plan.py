"""`dsv2 plan`: whether a config, mesh and batch fit the devices, before paying for them
(`dsv2_jax.plan`: arithmetic on the abstract model and the sharding rules; no device)."""


def add_cli(sub) -> None:
    from dsv2_jax.cli import HelpFormatter

    p = sub.add_parser(
        "plan", formatter_class=HelpFormatter,
        help="per-device memory and traffic of a training step on a mesh, without devices",
        description="Per device: parameters, gradients, optimizer state, activations (under "
                    "the config's remat), the backward's working set and the expert-dispatch "
                    "buffers; bytes sent per step over each mesh axis; whether it fits, and "
                    "if not what would help. See docs/scaling.md.")
    p.add_argument("--config", required=True, help="preset (tiny, bench, v2-lite, v2) or config.json path")
    p.add_argument("--mesh", required=True,
                   help="mesh axes, e.g. fsdp=16,expert=8; the device count is their product")
    p.add_argument("--devices", type=int, default=None,
                   help="device count, needed only when an axis is -1")
    p.add_argument("--batch-size", type=int, required=True, help="global batch, in sequences")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step, as dsv2 train --grad-accum")
    p.add_argument("--device-memory", default="80GB", help="memory of one device (80GB: H100)")
    p.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the master weights and the Adam moments")
    p.add_argument("--target", default="gpu", choices=["gpu", "tpu", "cpu"],
                   help="the compiler's habits to count (cpu: XLA:CPU's, what the tests measure)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields (e.g. dtype=bfloat16 remat=full capacity_factor=1.0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dsv2_jax.checkpoint.convert import parse_size
    from dsv2_jax.config import load_config
    from dsv2_jax.plan import format_plan, make_plan

    cfg = load_config(args.config).with_overrides(args.set)
    memory = parse_size(args.device_memory)
    if memory <= 0:
        raise ValueError(f"--device-memory must be positive, got {args.device_memory!r}")
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be positive, got {args.devices}")
    plan = make_plan(cfg, args.mesh, args.batch_size, args.seq_len, device_memory=memory,
                     master_dtype=args.master_dtype, target=args.target, n_devices=args.devices,
                     grad_accum=args.grad_accum)
    print(f"{args.config}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts or 0} routed experts")
    print(format_plan(plan))
    return 0
