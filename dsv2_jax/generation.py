"""`generate`: prefill, then a compiled decode loop over the latent cache, and sampling.

(The module is `generation`, not `generate`: importing a submodule binds its name on the
package, which would replace the package-level function `dsv2_jax.generate`.)

One call is one dispatch: prefill (expanded MLA, `decode.prefill`), the first sample, and a
`lax.while_loop` of absorbed decode steps (`decode.decode_step`) that ends when every row has
produced its EOS or `max_new_tokens` tokens. Everything the loop carries is an explicit value
(the `LatentCache`, the token buffer), so running it under a mesh only needs sharding
constraints on those values.

Shapes that reach the compiler are bucketed (`bucket`): the prompt width and the cache length
are padded, and max_new_tokens, temperature, top-k, top-p, seed and EOS are traced values, so
a new prompt length or a new sampling setting does not recompile; only the sampling mode
(greedy, sampling, or sampling with a filter) is static.

Conventions:
  * prompts are right-padded: `prompt_ids` [B, T], row b real up to prompt_lengths[b]
    (default T for every row); what lies past a row's length is ignored;
  * the result is [B, T + n] int32, n = max_new_tokens unless every row stopped earlier (then
    n is the step the last row stopped at, as HF `generate` trims). Row b is its prompt, then
    its new tokens right after position prompt_lengths[b] - 1, then padding;
  * a row stops after it emits `eos_id` (one id or several; None: never stops early); every
    position after it, and after its end, is `pad_id`, which defaults to the (first) eos_id,
    else cfg.pad_token_id, else 0.
"""

from __future__ import annotations

import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax.cache import init_cache, resolve_kind
from dsv2_jax.decode import absorb, decode_step, prefill


def bucket(n: int, minimum: int = 16) -> int:
    """The padded size for a length n: powers of two up to 1024, then multiples of 1024, so
    the waste stays under 2x (under 1.5x past 1024) while the number of shapes stays small."""
    if n <= 1024:
        return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return -(-n // 1024) * 1024


# ---------------------------------------------------------------------------------------
# Sampling.


def sample_logits(logits, key, temperature, top_k, top_p, *, greedy: bool, filtered: bool = True):
    """logits [B, V] float32 -> tokens [B] int32.

    greedy: argmax. Otherwise, in HF's order: divide by temperature, keep the top_k largest
    (top_k <= 0: all), then the smallest set of the largest whose probability reaches top_p
    (top_p >= 1: all; never fewer than one), and draw from the rest. Tokens whose logit
    equals the last one kept are all kept: as HF does for top-k; for top-p HF keeps those its
    sort puts first. temperature, top_k and top_p are traced; `filtered` (static) False skips
    the vocabulary sort when neither filter is on.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    # Shifted so that the largest is 0 before dividing: a tiny temperature then sends the
    # others to -inf rather than every logit to +-inf (the same distribution otherwise). A
    # subnormal temperature would flush to 0 (0 / 0 for the largest): the smallest normal
    # float stands in for it.
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), jnp.finfo(jnp.float32).tiny)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / t
    if filtered:
        desc = -jnp.sort(-logits, axis=-1)  # [B,V]
        keep = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)  # how many of the largest survive
        ranked = jnp.where(jnp.arange(V) < keep, desc, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the larger ones
        nucleus = jnp.maximum(1, jnp.sum(before < top_p, axis=-1))
        # Rounding can leave `before` a hair under 1 for the tail: top_p = 1 keeps all exactly.
        keep = jnp.where(top_p < 1.0, jnp.minimum(keep, nucleus), keep)
        threshold = jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# Streaming: the compiled loop reports each step's tokens to the host through one fixed
# callback, which forwards to the listener of the call in flight (a new Python callable per
# call would otherwise be a new function to compile).

_stream_lock = threading.Lock()
_listener = None


def _emit(step, tokens, done):
    if _listener is not None:
        _listener(int(step), np.asarray(tokens), np.asarray(done))


# ---------------------------------------------------------------------------------------
# The compiled call.


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "kind", "mode", "stream"))
def _generate_jit(graphdef, state, ids, lengths, max_new, temperature, top_k, top_p, seed, eos, pad,
                  *, max_len: int, kind: str, mode: tuple, stream: bool):
    """ids [B, Tb] int32 (padding replaced by valid ids), lengths [B], eos [S] stop ids (-1:
    none) -> (out [B, max_len] int32, n: the number of decode steps run, i.e. new tokens of
    the longest row)."""
    model = nnx.merge(graphdef, state)
    B, Tb = ids.shape
    greedy, filtered = mode
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               greedy=greedy, filtered=filtered)
    key = jax.random.key(seed)
    rows = jnp.arange(B)

    cache = init_cache(model.cfg, B, max_len, kind)
    logits, cache = prefill(model, ids, lengths, cache)
    weights = absorb(model, B)  # loop-invariant: split once, not per step
    tok = sample(logits, key=jax.random.fold_in(key, 0))

    prompt = jnp.pad(ids, ((0, 0), (0, max_len - Tb)))
    out = jnp.where(jnp.arange(max_len)[None, :] < lengths[:, None], prompt, pad)
    out = out.at[rows, lengths].set(tok)
    stops = lambda t: jnp.any(t[:, None] == eos[None, :], axis=-1)  # [B]
    if stream:  # no row had stopped before the first token
        jax.debug.callback(_emit, 0, tok, jnp.zeros((B,), bool), ordered=True)
    done = stops(tok)

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, done, cache, out = carry
        logits, cache = decode_step(model, weights, cache, tok)
        nxt = jnp.where(done, pad, sample(logits, key=jax.random.fold_in(key, i)))
        out = out.at[rows, lengths + i].set(nxt)
        if stream:
            jax.debug.callback(_emit, i, nxt, done, ordered=True)
        return i + 1, nxt, done | stops(nxt), cache, out

    n, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, cache, out))
    return out, n


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _eos_ids(eos_id) -> tuple[int, ...]:
    """`eos_id` (None, one id, or several) as a tuple of ids."""
    if eos_id is None:
        return ()
    ids = (eos_id,) if np.ndim(eos_id) == 0 else tuple(np.asarray(eos_id).reshape(-1).tolist())
    if not ids or not all(_is_int(i) for i in ids):
        raise ValueError(f"eos_id must be None, a token id or a non-empty list of them, got {eos_id!r}")
    return tuple(int(i) for i in ids)


def _padded(eos: tuple[int, ...]) -> tuple[int, ...]:
    """Stop ids padded with -1 (never a token) to a multiple of 8, so that none, one or a
    few stop ids share one compiled loop."""
    n = max(8, -(-len(eos) // 8) * 8)
    return eos + (-1,) * (n - len(eos))


def check_inputs(cfg, ids, lengths, max_new_tokens, temperature, top_k, top_p, eos_id):
    """Raises ValueError for arguments `generate` cannot run (what it checks first; callers
    that print before generating check with it first too)."""
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, seq], got shape {ids.shape}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError("empty prompt: give at least one token per row")
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be {B} integers, got {lengths!r}")
    if lengths.min() < 1:
        raise ValueError(f"empty prompt: row {int(lengths.argmin())} has prompt length {int(lengths.min())}")
    if lengths.max() > T:
        raise ValueError(f"prompt_lengths {int(lengths.max())} exceeds the prompt width {T}")
    real = np.arange(T)[None, :] < lengths[:, None]
    bad = real & ((ids < 0) | (ids >= cfg.vocab_size))
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"token id {int(ids[b, t])} (row {b}, position {t}) is outside the "
                         f"vocabulary [0, {cfg.vocab_size})")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    total = int(lengths.max()) + int(max_new_tokens)
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{total} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for e in _eos_ids(eos_id):
        if not 0 <= e < cfg.vocab_size:
            raise ValueError(f"eos_id {e} is outside the vocabulary [0, {cfg.vocab_size})")


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id=None, prompt_lengths=None,
             pad_id: int | None = None, cache_dtype: str | None = None, on_token=None) -> np.ndarray:
    """Continues each prompt by up to max_new_tokens tokens -> [B, T + n] int32 (see the
    module docstring for the layout, padding and stopping).

    prompt_ids [B, T] (or [T]); prompt_lengths [B] for right-padded prompts of mixed length.
    temperature 0 is greedy (top_k / top_p / seed unused); otherwise sampling with the key of
    `seed`, reproducible for the same call. cache_dtype: float32 | bfloat16 | float16 | int8 |
    fp8 (None: the compute dtype). on_token(step, tokens [B], done [B]) is called from the
    running loop as each step's tokens are chosen (done: rows that had stopped before it).
    Bad arguments raise ValueError.
    """
    cfg = model.cfg
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
    B, T = ids.shape if ids.ndim == 2 else (0, 0)
    lengths = np.full((B,), T, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(-1)
    temperature, top_p = float(temperature), float(top_p)
    check_inputs(cfg, ids, lengths, max_new_tokens, temperature, top_k, top_p, eos_id)
    eos = _eos_ids(eos_id)
    kind = resolve_kind(cfg, cache_dtype)
    if pad_id is None:
        pad_id = eos[0] if eos else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)

    Tb = bucket(T)
    # Cache lengths are multiples of 64: the Pallas decode kernel's block (others cost it a
    # padded copy of the cache per call).
    max_len = bucket(max(Tb, T + int(max_new_tokens)), minimum=64)
    real = np.arange(T)[None, :] < lengths[:, None]
    padded = np.zeros((B, Tb), np.int32)
    padded[:, :T] = np.where(real, ids, 0)
    greedy = temperature == 0.0
    mode = (greedy, not greedy and (top_k > 0 or top_p < 1.0))
    graphdef, state = nnx.split(model)
    args = (graphdef, state, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32),
            jnp.int32(max_new_tokens), jnp.float32(temperature if not greedy else 1.0),
            jnp.int32(top_k), jnp.float32(top_p), jnp.uint32(seed % 2**32),
            jnp.asarray(_padded(eos), jnp.int32), jnp.int32(pad_id))
    kw = dict(max_len=max_len, kind=kind, mode=mode, stream=on_token is not None)
    global _listener
    if on_token is None:
        out, n = _generate_jit(*args, **kw)
        out, n = np.asarray(out), int(n)
    else:
        with _stream_lock:
            _listener = on_token
            try:
                out, n = _generate_jit(*args, **kw)
                out, n = np.asarray(out), int(n)
                jax.effects_barrier()
            finally:
                _listener = None
    return out[:, : T + n].astype(np.int32)
