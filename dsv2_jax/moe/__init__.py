"""DeepSeekMoE, one idea per module:

    routing.py   the router, expert selection (greedy, group-limited, device-limited),
                 capacity and token dropping, `RouterOutput`
    losses.py    the expert-, device- and communication-level balance losses
    gmm.py       the grouped matmul over rows sorted by expert, one backend per platform
    dispatch.py  one token shard's routed experts: per-destination dispatch, the exchange
                 (fixed or ragged all-to-all), the tensor-parallel sum
    layer.py     the `MoE` module and the `shard_map` that runs `dispatch` per shard
"""

from dsv2_jax.moe.dispatch import (a2a_flavor, emulate_ragged_all_to_all, ragged_all_to_all_emulated,
                                   traffic_figures)
from dsv2_jax.moe.gmm import expert_ffn, gmm_backend, routed_experts
from dsv2_jax.moe.layer import MoE, Experts, expert_parallel_size, routed_moe, simulate_token_shards
from dsv2_jax.moe.losses import balance_losses
from dsv2_jax.moe.routing import (Router, RouterOutput, capacity_keep, drop_groups, never_drop_tokens,
                                  route, select_experts)

__all__ = [
    "MoE", "Experts", "Router", "RouterOutput", "a2a_flavor", "balance_losses", "capacity_keep",
    "emulate_ragged_all_to_all",
    "drop_groups", "expert_ffn", "expert_parallel_size", "gmm_backend", "never_drop_tokens",
    "ragged_all_to_all_emulated", "route", "routed_experts", "routed_moe", "select_experts",
    "simulate_token_shards", "traffic_figures",
]
