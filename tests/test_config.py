"""DeepseekV2Config: both config.json spellings, the written form, validation, presets."""

import dataclasses
import json
import math
import os

import pytest

import hf_reference as ref
from dsv2_jax import DeepseekV2Config, load_config
from dsv2_jax.config import PRESETS, preset_path

# The published shapes (REFERENCE.md, "Configurations"), written out by hand so that a wrong
# preset file cannot agree with itself.
PUBLISHED = {
    "v2": dict(
        vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1536, intermediate_size=12288, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
        norm_topk_prob=False, aux_loss_alpha=0.003, seq_aux=True, rope_theta=10000),
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1408, intermediate_size=10944, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True, rope_theta=10000),
}
PUBLISHED_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


def _official_dict(**kw):
    """A config.json in the official deepseek-ai spelling, tiny shapes, non-default values."""
    d = dict(ref.V2, model_type="deepseek_v2", rope_theta=5000.0,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
             aux_loss_alpha=0.003, seq_aux=False, moe_layer_freq=2, scoring_func="softmax",
             ep_size=1, eos_token_id=[7, 8])
    d.update(kw)
    return d


def _hf_fields(cfg):
    return {k: getattr(cfg, k) for k in DeepseekV2Config.hf_field_names()}


def test_reads_official_form():
    cfg = DeepseekV2Config.from_hf(_official_dict())
    assert cfg.rope_type == "yarn"
    assert cfg.rope_theta == 5000.0
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_scaling["mscale_all_dim"] == 0.707
    assert (cfg.aux_loss_alpha, cfg.seq_aux, cfg.moe_layer_freq) == (0.003, False, 2)
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group) == ("group_limited_greedy", 4, 2)
    assert cfg.scoring_func == "softmax"
    assert cfg.eos_token_id == (7, 8) and cfg.eos_token_ids == (7, 8)  # every stop id kept
    assert cfg.to_hf_dict()["eos_token_id"] == [7, 8]  # and written back as a list
    assert hash(cfg) == hash(DeepseekV2Config.from_hf(_official_dict()))
    assert DeepseekV2Config.from_hf(_official_dict(eos_token_id=3)).eos_token_ids == (3,)
    assert DeepseekV2Config.from_hf(_official_dict(eos_token_id=None)).eos_token_ids == ()
    for bad in ([], ["7"], 7.5, [True]):
        with pytest.raises(ValueError, match="eos_token_id"):
            DeepseekV2Config.from_hf(_official_dict(eos_token_id=bad))


def test_reads_transformers5_form_as_written_by_transformers(tmp_path):
    """transformers writes `rope_parameters`; the same model read from either spelling is the
    same config."""
    hf = ref.hf_config(**dict(ref.V2, rope_parameters=dict(ref.YARN, rope_theta=5000.0)))
    hf.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw
    ours = DeepseekV2Config.from_hf(str(tmp_path))
    assert ours.rope_theta == 5000.0
    assert ours.rope_scaling == {k: v for k, v in ref.YARN.items() if k not in ("rope_type", "rope_theta")} | {"type": "yarn"}
    official = DeepseekV2Config.from_hf(_official_dict(
        rope_scaling=dict(ours.rope_scaling), aux_loss_alpha=0.001, seq_aux=True,
        moe_layer_freq=1, eos_token_id=None))
    assert _hf_fields(ours) == _hf_fields(official)


def test_default_rope_in_either_form_is_no_scaling():
    a = DeepseekV2Config.from_hf(dict(ref.V2, rope_parameters={"rope_type": "default", "rope_theta": 123.0}))
    b = DeepseekV2Config.from_hf(dict(ref.V2, rope_theta=123.0, rope_scaling=None))
    assert a.rope_scaling is None and a.rope_type == "default" and a.rope_theta == 123.0
    assert a == b


@pytest.mark.parametrize("name", PRESETS)
def test_writes_official_form_and_round_trips(tmp_path, name):
    cfg = load_config(name)
    d = cfg.to_hf_dict()
    assert "rope_parameters" not in d
    if cfg.rope_scaling is not None:
        assert d["rope_scaling"]["type"] == "yarn" and "rope_type" not in d["rope_scaling"]
        assert "rope_theta" not in d["rope_scaling"] and d["rope_theta"] == cfg.rope_theta
    for k in ("aux_loss_alpha", "seq_aux", "moe_layer_freq", "scoring_func", "topk_method",
              "n_group", "topk_group", "norm_topk_prob"):
        assert d[k] == getattr(cfg, k), k
    cfg.save(str(tmp_path))
    back = DeepseekV2Config.from_hf(str(tmp_path))
    assert back == cfg and hash(back) == hash(cfg)


def test_transformers_reads_what_we_write(tmp_path):
    from transformers import DeepseekV2Config as HFConfig

    cfg = load_config("v2")
    cfg.save(str(tmp_path))
    hf = HFConfig.from_pretrained(str(tmp_path))
    rp = hf.rope_parameters
    assert rp["rope_type"] == "yarn" and rp["factor"] == 40 and rp["mscale_all_dim"] == 0.707
    assert rp["original_max_position_embeddings"] == 4096 and rp["rope_theta"] == 10000
    assert (hf.n_routed_experts, hf.n_group, hf.topk_group, hf.topk_method) == (
        160, 8, 3, "group_limited_greedy")
    assert hf.q_lora_rank == 1536 and hf.routed_scaling_factor == 16.0


# (config.json overrides, the field the error must name)
INVALID = [
    (dict(num_attention_heads=5), "num_attention_heads"),  # 48 % 5
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),  # 8 experts % 3 groups
    (dict(topk_group=5), "topk_group"),  # more groups kept than exist
    (dict(topk_group=1, num_experts_per_tok=3), "topk_group"),  # 1 group of 2 < K = 3
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 16}), "rope_scaling"),
    # transformers' DeepseekV2 cannot run a null factor either (its softmax scale needs one)
    (dict(rope_scaling={"type": "yarn", "factor": None, "original_max_position_embeddings": 16}),
     "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                        "truncate": "no"}), "rope_scaling"),
    (dict(aux_loss_alpha=-0.001), "aux_loss_alpha"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_scaling"),
    (dict(model_type="deepseek_v3"), "model_type"),
]


@pytest.mark.parametrize("kw,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_combinations_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"DeepseekV2Config\.{field}\b"):
        DeepseekV2Config.from_hf(_official_dict(**kw))


@pytest.mark.parametrize("kw,field", [
    (dict(comm_aux_loss_alpha=-0.02), "comm_aux_loss_alpha"),
    (dict(device_aux_loss_alpha=float("inf")), "device_aux_loss_alpha"),
    (dict(max_devices_per_token=3), "max_devices_per_token"),  # with no device groups to limit
])
def test_invalid_training_fields_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"DeepseekV2Config\.{field}\b"):
        load_config("v2-lite").replace(**kw)


def test_invalid_rope_type_names_the_type():
    with pytest.raises(ValueError, match="dynamic"):
        DeepseekV2Config.from_hf(dict(ref.V2, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="n_experts"):
        DeepseekV2Config.from_hf(_official_dict(), n_experts=4)
    with pytest.raises(ValueError, match="not a DeepseekV2Config field"):
        load_config("tiny").with_overrides(["hidden=4"])


def test_with_overrides_parses_json_values():
    cfg = load_config("tiny").with_overrides(["num_hidden_layers=2", "q_lora_rank=null",
                                              "moe_backend=blocked", "routed_scaling_factor=2.5"])
    assert (cfg.num_hidden_layers, cfg.q_lora_rank, cfg.moe_backend, cfg.routed_scaling_factor) == (
        2, None, "blocked", 2.5)
    with pytest.raises(ValueError, match=r"DeepseekV2Config\.n_group"):
        load_config("tiny").with_overrides(["n_group=3"])


@pytest.mark.parametrize("name", ["v2", "v2-lite"])
def test_presets_match_the_published_configs(name):
    cfg = load_config(name)
    for k, v in PUBLISHED[name].items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert dict(cfg.rope_scaling) == PUBLISHED_YARN
    assert cfg.max_position_embeddings == 163840
    assert cfg.layer_segments() == [("dense", 0, 1), ("moe", 1, cfg.num_hidden_layers - 1)]


def test_presets_ship_inside_the_package():
    import dsv2_jax.configs

    pkg_dir = os.path.dirname(os.path.abspath(dsv2_jax.configs.__file__))
    for name in PRESETS:
        p = preset_path(name)
        assert os.path.dirname(os.path.abspath(p)) == pkg_dir and os.path.isfile(p), p
        assert load_config(p) == load_config(name)
    tiny = load_config("tiny")
    assert tiny.n_routed_experts and tiny.hidden_size <= 256  # small enough for CPU tests
    with pytest.raises(FileNotFoundError, match="v2-lite"):
        load_config("v3")


def test_yarn_softmax_scale_matches_transformers():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

    cfg = load_config("v2")
    m = 0.1 * 0.707 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    hf_scale = yarn_apply_mscale(dict(PUBLISHED_YARN, rope_type="yarn"), 192 ** -0.5)
    assert cfg.softmax_scale == pytest.approx(hf_scale, rel=1e-12)
    assert load_config("tiny").softmax_scale == pytest.approx(48 ** -0.5, rel=1e-12)


def test_moe_layer_freq_follows_the_official_rule():
    cfg = DeepseekV2Config.from_hf(_official_dict(num_hidden_layers=6, first_k_dense_replace=1,
                                                  moe_layer_freq=2))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert cfg.layer_segments() == [("dense", 0, 2), ("moe", 2, 1), ("dense", 3, 1),
                                    ("moe", 4, 1), ("dense", 5, 1)]
    dense = dataclasses.replace(cfg, n_routed_experts=None)
    assert dense.layer_segments() == [("dense", 0, 6)]


def test_official_gready_spelling_is_greedy():
    cfg = DeepseekV2Config.from_hf(dict(ref.LITE, topk_method="gready"))
    assert cfg.topk_method == "greedy" and cfg == DeepseekV2Config.from_hf(ref.LITE)


# Fields of the published config.json files (deepseek-ai/DeepSeek-V2, DeepSeek-V2-Lite) that
# PUBLISHED leaves out, shared by both, and the paper's training settings for V2 (alpha2 =
# 0.05, alpha3 = 0.02; D = 8 device groups, M = 3 of them per token).
PUBLISHED_COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, moe_layer_freq=1,
                        bos_token_id=100000, eos_token_id=100001, scoring_func="softmax",
                        hidden_act="silu", attention_bias=False, num_key_value_heads=None)
PAPER_V2_TRAINING = dict(device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02,
                         num_device_groups=8, max_devices_per_token=3)


@pytest.mark.parametrize("name", ["v2", "v2-lite"])
def test_presets_match_the_rest_of_the_published_configs(name):
    """A preset that differs from the checkpoint's own config.json in the norm epsilon, tied
    embeddings, the MoE layer rule or the stop ids loads the published weights into a
    different model (wrong logits, wrong stopping) without any error; the V2 preset's
    training settings are the paper's."""
    cfg = load_config(name)
    for k, v in PUBLISHED_COMMON.items():
        want = cfg.num_attention_heads if k == "num_key_value_heads" else v
        assert getattr(cfg, k) == want, (k, getattr(cfg, k), want)
    training = PAPER_V2_TRAINING if name == "v2" else dict(
        device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0, num_device_groups=0, max_devices_per_token=0)
    for k, v in training.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)


def test_range_checks_accept_their_end_points():
    """Each range's end points are legal settings: every sequence protected from dropping
    (never_drop_fraction 1), none (0), an all-dense stack (first_k_dense_replace = layers), a
    token allowed on every device group (max_devices_per_token = num_device_groups). An
    off-by-one check would refuse these configs."""
    base = load_config("tiny")
    for kw in (dict(never_drop_fraction=1.0), dict(never_drop_fraction=0.0),
               dict(first_k_dense_replace=base.num_hidden_layers),
               dict(num_device_groups=4, max_devices_per_token=4),
               dict(num_device_groups=2, max_devices_per_token=2),
               dict(capacity_factor=1e-3)):
        cfg = base.replace(**kw)
        for k, v in kw.items():
            assert getattr(cfg, k) == v
    assert base.replace(first_k_dense_replace=base.num_hidden_layers).layer_segments() == [
        ("dense", 0, base.num_hidden_layers)]


@pytest.mark.parametrize("kw,field", [
    (dict(capacity_factor=0.0), "capacity_factor"),  # a capacity of no rows drops every token
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(never_drop_fraction=1.01), "never_drop_fraction"),
    (dict(never_drop_fraction=-0.1), "never_drop_fraction"),
    (dict(q_lora_rank=0), "q_lora_rank"),  # a zero-width query latent
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(num_device_groups=4, max_devices_per_token=5), "max_devices_per_token"),
    (dict(num_device_groups=4, max_devices_per_token=0), "max_devices_per_token"),
    (dict(rope_scaling={"type": "yarn", "factor": 0, "original_max_position_embeddings": 16}),
     "rope_scaling"),  # log(0) in the softmax scale
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
     "rope_scaling"),
])
def test_range_checks_refuse_just_outside(kw, field):
    with pytest.raises(ValueError, match=rf"DeepseekV2Config\.{field}\b"):
        load_config("tiny").replace(**kw)


def test_info_prints_total_and_active_counts(capsys):
    """`dsv2 info v2-lite`: the published 15.7B total and 2.4B active per token, each on its
    own line (a swapped or repeated figure misleads every sizing decision)."""
    from dsv2_jax.cli import main

    assert main(["info", "v2-lite"]) == 0
    out = capsys.readouterr().out
    total = [s for s in out.splitlines() if s.startswith("total parameters:")]
    active = [s for s in out.splitlines() if s.startswith("active per token:")]
    assert len(total) == len(active) == 1, out
    assert "(15.7" in total[0] and "(2.6" not in total[0], total
    assert "(2." in active[0] and "15.7" not in active[0], active
