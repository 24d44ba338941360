"""The one model config: a frozen dataclass whose fields carry the HF `config.json` names.

`DeepseekV2Config.from_hf` reads both spellings of a DeepSeek-V2 config.json:
  * the official one (deepseek-ai repos): `rope_theta` + `rope_scaling: {type: yarn, ...}`;
  * the transformers-5 one: `rope_parameters: {rope_type: yarn, rope_theta: ..., ...}`.
`to_hf_dict` always writes the official form, which transformers, vLLM and SGLang all read.

Fields after `attention_dropout` are this project's own (training and runtime knobs); they are
written under the `dsv2_jax` key of config.json so that other readers ignore them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from typing import Any, Mapping

PRESETS = ("tiny", "bench", "v2-lite", "v2")

_TOPK_METHODS = ("greedy", "group_limited_greedy")
_ROPE_TYPES = ("default", "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Field annotation -> (accepted Python types, None allowed), for the type check in validate.
_FIELD_TYPES = {
    "int": ((int,), False), "int|None": ((int,), True), "float": ((int, float), False),
    "float|None": ((int, float), True), "bool": ((bool,), False), "str": ((str,), False),
    "Mapping[str,Any]|None": ((Mapping,), True),
}


@dataclasses.dataclass(frozen=True)
class DeepseekV2Config:
    # --- HF / official DeepSeek-V2 fields -------------------------------------------------
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    # One stop id, or several (HF writes a list; kept as a tuple so that configs hash).
    eos_token_id: int | tuple[int, ...] | None = 100001
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # Official form: None or {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}.
    rope_scaling: Mapping[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- dsv2_jax fields ------------------------------------------------------------------
    # Balance losses of the paper beyond the expert-level one (aux_loss_alpha = alpha1).
    device_aux_loss_alpha: float = 0.0  # alpha2
    comm_aux_loss_alpha: float = 0.0  # alpha3
    # Device-limited routing (training): experts split into `num_device_groups` groups (the
    # expert-parallel devices, or this many on one device); each token reaches at most
    # `max_devices_per_token` of them. 0 = off.
    num_device_groups: int = 0
    max_devices_per_token: int = 0
    # Token dropping (training only): None = dropless.
    capacity_factor: float | None = None
    never_drop_fraction: float = 0.1
    # Runtime.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    moe_backend: str = "auto"  # auto | ragged_dot | blocked
    # Expert-parallel exchange: auto (ragged all-to-all on GPU/TPU when dropless, whole
    # buffers on CPU and under a capacity) | fixed | ragged.
    moe_dispatch: str = "auto"
    attn_impl: str = "xla"
    remat: str = "none"  # none | full | dots
    # Layers per scan iteration. 1 keeps compile time flat in depth; unrolling a short stack
    # saves XLA:CPU the zero-filled per-layer residual buffers of the scan (~15% of a tiny
    # train step on 2 cores).
    scan_unroll: int = 1
    # Training loss: sequence positions per chunk of logits (0: all at once). The float32
    # logits of a chunk, [batch, ce_chunk, vocab], are the largest tensor of the loss.
    ce_chunk: int = 512

    def __post_init__(self):
        # Normalise a few spellings so that equal configs compare (and hash) equal.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.topk_method == "gready":  # the official code's default is spelled so
            object.__setattr__(self, "topk_method", "greedy")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, Mapping):
                raise ValueError(f"DeepseekV2Config.rope_scaling: an object (or null), got "
                                 f"{self.rope_scaling!r}")
            rs = dict(self.rope_scaling)
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            rs.pop("rope_theta", None)
            if rs.get("type", "default") == "default":
                rs = None
            object.__setattr__(self, "rope_scaling", rs)
        self.validate()

    def __hash__(self):
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    # --- derived ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every stop id of the config (none: empty)."""
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["type"]

    def is_moe_layer(self, i: int) -> bool:
        """Official DeepSeek-V2 rule for which decoder layers carry the MoE FFN."""
        return (
            bool(self.n_routed_experts)
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    def layer_segments(self) -> list[tuple[str, int, int]]:
        """Runs of consecutive identical layers as (kind, first_layer, count), kind dense|moe.

        Each run is one stacked (scanned) block of parameters, so compile time is set by the
        number of runs (2 for every published config), not by depth.
        """
        segs: list[tuple[str, int, int]] = []
        for i in range(self.num_hidden_layers):
            kind = "moe" if self.is_moe_layer(i) else "dense"
            if segs and segs[-1][0] == kind:
                segs[-1] = (kind, segs[-1][1], segs[-1][2] + 1)
            else:
                segs.append((kind, i, 1))
        return segs

    def yarn_mscale(self, mscale: float) -> float:
        factor = float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0
        if factor <= 1.0:
            return 1.0
        return 0.1 * mscale * math.log(factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            m_all = self.rope_scaling.get("mscale_all_dim", 0)
            if m_all:
                m = self.yarn_mscale(m_all)
                scale = scale * m * m
        return scale

    # --- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field, msg):
            raise ValueError(f"DeepseekV2Config.{field}: {msg}")

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = _FIELD_TYPES.get(f.type.replace(" ", ""))
            if want is None:
                continue
            types, optional = want
            if v is None and optional:
                continue
            if isinstance(v, bool) and bool not in types:
                bad(f.name, f"expected {f.type}, got {v!r}")
            if not isinstance(v, types):
                bad(f.name, f"expected {f.type}, got {type(v).__name__} {v!r}")

        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) or (isinstance(eos, tuple) and eos and all(map(_is_int, eos)))):
            bad("eos_token_id", f"expected null, an integer or a non-empty list of integers, got {eos!r}")
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                  "moe_layer_freq", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        # (field, must be > 0; else >= 0); the balance-loss weights may be 0, never negative
        for f, strict in (("rms_norm_eps", True), ("routed_scaling_factor", True),
                          ("initializer_range", False), ("rope_theta", True),
                          ("aux_loss_alpha", False), ("device_aux_loss_alpha", False),
                          ("comm_aux_loss_alpha", False)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    (v > 0 if strict else v >= 0) and v < math.inf):
                bad(f, f"must be {'positive' if strict else '>= 0'} and finite, got {v!r}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} heads do not divide "
                f"hidden_size {self.hidden_size}")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", "MLA has one latent shared by all heads; "
                f"expected {self.num_attention_heads}, got {self.num_key_value_heads}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", f"must be null or positive, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"{self.first_k_dense_replace} not in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.attention_bias:
            # The model has no bias parameters: building one would silently drop them.
            bad("attention_bias", "DeepSeek-V2 projections have no biases; true is not supported")
        if self.attention_dropout:
            bad("attention_dropout", f"dropout is not implemented (DeepSeek-V2 trains without it); "
                f"got {self.attention_dropout}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.n_routed_experts:
            e = self.n_routed_experts
            k = self.num_experts_per_tok
            if not k or not 1 <= k <= e:
                bad("num_experts_per_tok", f"must be in [1, n_routed_experts={e}], got {k!r}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", f"must be positive, got {self.moe_intermediate_size}")
            if self.topk_method not in _TOPK_METHODS:
                bad("topk_method", f"unknown {self.topk_method!r}; expected one of {_TOPK_METHODS}")
            if self.scoring_func != "softmax":
                bad("scoring_func", f"DeepSeek-V2 uses 'softmax', got {self.scoring_func!r}")
            if self.topk_method == "group_limited_greedy":
                g, tg = self.n_group, self.topk_group
                if not g or e % g:
                    bad("n_group", f"n_routed_experts={e} is not divisible by n_group={g!r}")
                if not tg or not 1 <= tg <= g:
                    bad("topk_group", f"must be in [1, n_group={g}], got {tg!r}")
                if tg * (e // g) < k:
                    bad("topk_group", f"{tg} groups of {e // g} experts hold fewer than "
                        f"num_experts_per_tok={k}")
            if self.num_device_groups:
                d, m = self.num_device_groups, self.max_devices_per_token
                if e % d:
                    bad("num_device_groups", f"n_routed_experts={e} is not divisible by {d}")
                if not 1 <= m <= d:
                    bad("max_devices_per_token", f"must be in [1, num_device_groups={d}], got {m}")
                if m * (e // d) < k:
                    bad("max_devices_per_token", f"{m} device groups of {e // d} experts hold "
                        f"fewer than num_experts_per_tok={k}")
                if self.topk_method == "group_limited_greedy":
                    # Both limits apply: the fewest experts that can survive them must be >= K.
                    g, tg = self.n_group, self.topk_group
                    if g % d == 0:
                        least = min(tg, m) * (e // g)
                    elif d % g == 0:
                        least = min(m, tg * d // g) * (e // d)
                    else:
                        bad("num_device_groups", f"{d} device groups and n_group={g} must divide one "
                            f"another when group-limited and device-limited routing are both on")
                    if least < k:
                        bad("max_devices_per_token", f"with topk_group={tg} of n_group={g} and {m} of "
                            f"{d} device groups, as few as {least} experts remain, fewer than "
                            f"num_experts_per_tok={k}")
        if self.max_devices_per_token and not self.num_device_groups:
            bad("max_devices_per_token", f"{self.max_devices_per_token} needs num_device_groups, the "
                f"groups it limits (on a mesh, the expert devices: set num_device_groups to the "
                f"expert axis size)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            bad("capacity_factor", f"must be null or positive, got {self.capacity_factor}")
        if not 0.0 <= self.never_drop_fraction <= 1.0:
            bad("never_drop_fraction", f"must be in [0, 1], got {self.never_drop_fraction}")
        rt = self.rope_type
        if rt not in _ROPE_TYPES:
            bad("rope_scaling", f"unknown rope type {rt!r}; expected one of {_ROPE_TYPES}")
        if rt == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                v = self.rope_scaling.get(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    bad("rope_scaling", f"yarn needs a positive {key!r}, got {v!r}")
            if not isinstance(self.rope_scaling.get("truncate", True), bool):
                bad("rope_scaling", f"'truncate' must be true or false, got "
                    f"{self.rope_scaling['truncate']!r}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in _DTYPES:
                bad(f, f"unknown dtype {getattr(self, f)!r}; expected one of {_DTYPES}")
        if self.moe_backend not in ("auto", "ragged_dot", "blocked"):
            bad("moe_backend", f"unknown {self.moe_backend!r}; expected auto|ragged_dot|blocked")
        if self.moe_dispatch not in ("auto", "fixed", "ragged"):
            bad("moe_dispatch", f"unknown {self.moe_dispatch!r}; expected auto|fixed|ragged")
        if self.attn_impl not in ("xla", "reference", "pallas"):
            bad("attn_impl", f"unknown {self.attn_impl!r}; expected xla|reference|pallas")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            bad("scan_unroll", f"must be a positive integer, got {self.scan_unroll!r}")
        if not isinstance(self.ce_chunk, int) or self.ce_chunk < 0:
            bad("ce_chunk", f"must be a non-negative integer, got {self.ce_chunk!r}")
        if self.remat not in ("none", "full", "dots"):
            bad("remat", f"unknown {self.remat!r}; expected none|full|dots")

    # --- (de)serialisation --------------------------------------------------------------
    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        names = [f.name for f in dataclasses.fields(cls)]
        return tuple(names[: names.index("attention_dropout") + 1])

    @classmethod
    def from_hf(cls, src: str | os.PathLike | Mapping[str, Any], **overrides) -> "DeepseekV2Config":
        """Reads an HF config: a dict, a config.json path, or a directory holding one."""
        if isinstance(src, Mapping):
            raw = dict(src)
        else:
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                parent = os.path.dirname(path) or "."
                if os.path.basename(path) != "config.json":
                    raise FileNotFoundError(f"{path}: no such file or directory")
                if not os.path.isdir(parent):
                    raise FileNotFoundError(f"{parent}: no such directory")
            try:
                with open(path) as f:
                    raw = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no such config.json") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: a config is a JSON object, got {type(raw).__name__}")
        mt = raw.get("model_type", "deepseek_v2")
        if mt != "deepseek_v2":
            raise ValueError(f"DeepseekV2Config.model_type: expected 'deepseek_v2', got {mt!r}")
        kw: dict[str, Any] = {}
        hf_names = set(cls.hf_field_names())
        for k, v in raw.items():
            if k in hf_names:
                kw[k] = v
        # transformers-5 form.
        rp = raw.get("rope_parameters")
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            kw["rope_scaling"] = rp
        elif raw.get("rope_scaling"):
            kw["rope_scaling"] = dict(raw["rope_scaling"])
        extras = raw.get("dsv2_jax", {}) or {}
        kw.update({k: v for k, v in extras.items() if k not in hf_names})
        kw.update(overrides)
        unknown = set(kw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"DeepseekV2Config: unknown field(s) {sorted(unknown)}")
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json form (plus our own knobs under `dsv2_jax`)."""
        d = dataclasses.asdict(self)
        out: dict[str, Any] = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
        for k in self.hf_field_names():
            out[k] = d[k]
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        out["torch_dtype"] = self.param_dtype
        out["dsv2_jax"] = {k: d[k] for k in d if k not in out}
        return out

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)

    def replace(self, **kw) -> "DeepseekV2Config":
        return dataclasses.replace(self, **kw)

    def with_overrides(self, items: list[str] | None) -> "DeepseekV2Config":
        """Applies `key=value` strings (values parsed as JSON, else kept as strings)."""
        if not items:
            return self
        names = {f.name: f for f in dataclasses.fields(self)}
        kw = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"--set {item!r}: expected key=value")
            k, v = item.split("=", 1)
            k = k.strip()
            if k not in names:
                raise ValueError(f"--set {k}: not a DeepseekV2Config field")
            try:
                value = json.loads(v)
            except json.JSONDecodeError:
                value = v
            if k in kw and kw[k] != value:
                raise ValueError(f"--set {k}: given twice, as {kw[k]!r} and {value!r}")
            kw[k] = value
        return self.replace(**kw)


def preset_path(name: str) -> str:
    return str(resources.files("dsv2_jax.configs").joinpath(f"{name}.json"))


def load_config(name_or_path: str | os.PathLike, **overrides) -> DeepseekV2Config:
    """A preset name (`tiny`, `v2-lite`, `v2`), a config.json, or a directory holding one."""
    s = os.fspath(name_or_path)
    if s in PRESETS:
        return DeepseekV2Config.from_hf(preset_path(s), **overrides)
    if not os.path.exists(s):
        raise FileNotFoundError(f"{s!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return DeepseekV2Config.from_hf(s, **overrides)
