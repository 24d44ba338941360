"""Decode throughput: dsv2_jax `generate` (absorbed MLA over the latent cache) against HF
transformers `generate` (PyTorch, float32) on the same config and the same weights, in one
process.

    python scripts/bench_generate.py                 # the "bench" config of issue 12
    python scripts/bench_generate.py --quick         # a smoke run at toy size
    python scripts/bench_generate.py --config tiny --cases 1x256

Decode-only tokens/s, prefill excluded: time for n+1 new tokens minus time for 1, greedy, no
EOS, times batch x n. Cases (batch x prompt): 1x256 and 4x2048 by default, 128 new tokens.
Rounds alternate (ours, theirs) so that machine noise hits both; the median ratio is printed.
Compilation is excluded (a warm-up call of each shape first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

# Issue 12's DeepSeek-V2-shaped bench config.
BENCH = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=352,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
    q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy",
    n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
QUICK = dict(BENCH, vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=512)


def configs(name: str):
    """(our config, HF config) for "bench", "quick", a preset or a config.json."""
    from dsv2_jax import DeepseekV2Config, load_config
    from dsv2_jax.benchmark import hf_config

    if name in ("bench", "quick"):
        ours = DeepseekV2Config(**(BENCH if name == "bench" else QUICK))
    else:
        ours = load_config(name)
    ours = ours.replace(dtype="float32", param_dtype="float32", eos_token_id=None, bos_token_id=None)
    hf = hf_config(ours)
    return ours, hf


def ours_from_hf(hf_model):
    """Our model holding the HF model's weights, through the checkpoint path users take
    (save_pretrained, then from_pretrained)."""
    import tempfile

    from dsv2_jax import from_pretrained

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return from_pretrained(d, dtype="float32")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench", help='"bench" (issue 12), a preset or a config.json')
    ap.add_argument("--cases", default="1x256,4x2048", help="BATCHxPROMPT,...")
    ap.add_argument("--new", type=int, default=128, help="new tokens timed per case")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-dtype", default=None, help="our cache storage (default: float32)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, all cores). On a shared machine "
                         "torch's per-op thread barriers make HF decode up to ~10x slower under "
                         "contention; 1 thread is the robust comparison there")
    ap.add_argument("--quick", action="store_true", help="toy config, 1x32 and 4x64, 16 new tokens")
    a = ap.parse_args()
    if a.quick:
        a.config, a.cases, a.new, a.rounds = "quick", "1x32,4x64", 16, 1

    import jax
    import torch
    from transformers import DeepseekV2ForCausalLM

    from dsv2_jax.cache import cache_size
    from dsv2_jax.generation import generate

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    cfg, hf_cfg = configs(a.config)
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(hf_cfg).float().eval()
    model = ours_from_hf(hf)
    rng = np.random.default_rng(0)

    def ours(ids, n):
        t = time.perf_counter()
        generate(model, ids, n, cache_dtype=a.cache_dtype)  # returns host ids: synchronous
        return time.perf_counter() - t

    def theirs(ids, n):
        tids = torch.as_tensor(ids, dtype=torch.long)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t

    print(f"config {a.config}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, kv_lora {cfg.kv_lora_rank}; "
          f"our cache {cache_size(cfg, a.cache_dtype).bytes_per_token} B/token; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    summary = []
    for case in a.cases.split(","):
        B, T = (int(x) for x in case.lower().split("x"))
        ids = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
        t0 = time.perf_counter()
        ours(ids, 1), ours(ids, a.new + 1)  # compile both (they share the bucket: usually one)
        compile_s = time.perf_counter() - t0
        theirs(ids, 1)
        rows = []
        for r in range(a.rounds):
            o = ours(ids, a.new + 1) - ours(ids, 1)
            h = theirs(ids, a.new + 1) - theirs(ids, 1)
            tok = B * a.new
            rows.append((tok / o, tok / h))
            print(f"  {B}x{T} round {r}: dsv2_jax {tok / o:8.1f} tok/s   transformers {tok / h:8.1f} tok/s   "
                  f"ratio {h / o:.2f}x", flush=True)
        ratio = statistics.median(x / y for x, y in rows)
        summary.append((case, statistics.median(x for x, _ in rows),
                        statistics.median(y for _, y in rows), ratio))
        print(f"  ({B}x{T}: first calls incl. compile {compile_s:.1f} s)", flush=True)
    print("\ndecode-only tokens/s (prefill excluded), median over rounds")
    print(f"{'batch x prompt':>15} {'dsv2_jax':>10} {'transformers':>13} {'ratio':>7}")
    for case, o, h, r in summary:
        print(f"{case:>15} {o:>10.1f} {h:>13.1f} {r:>6.2f}x")


if __name__ == "__main__":
    main()
