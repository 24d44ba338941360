"""The learning-rate schedule, its default warm-up and the weight-decay mask, with values
(train/optim.py, docs/training.md "Optimizer")."""

import math

import jax
import numpy as np
import pytest

from dsv2_jax.train.loop import warmup_length
from dsv2_jax.train.optim import decay_mask, lr_schedule


def _rates(schedule, counts):
    return [float(schedule(c)) for c in counts]


@pytest.mark.parametrize("kind", ["step", "cosine", "constant"])
def test_warmup_rises_linearly_from_peak_over_warmup_to_peak(kind):
    """The rate rises linearly from peak / W at optimizer count 0 (training step 1) to the
    peak at count W: the first step already trains. A warm-up starting at 0 would waste
    step 1 and give every warm-up step less than it should."""
    peak, total, warm = 2.0, 100, 10
    s = lr_schedule(peak, total, warm, kind)
    want = [peak / warm + (peak - peak / warm) * c / warm for c in range(warm)]
    np.testing.assert_allclose(_rates(s, range(warm)), want, rtol=1e-6)
    np.testing.assert_allclose(_rates(s, [0, 1, 9]), [0.2, 0.38, 1.82], rtol=1e-6)
    np.testing.assert_allclose(float(s(warm)), peak, rtol=1e-6)


@pytest.mark.parametrize("warm", [0, 10, 25])
def test_step_schedule_decays_at_60_and_90_percent_of_all_steps_whatever_the_warmup(warm):
    """`--schedule step` (the paper's): x0.316 from 60% of the training steps, again from 90%,
    counted from step 0 (the warm-up included), so a longer warm-up does not push the decays
    later."""
    peak, total = 1.0, 100
    s = lr_schedule(peak, total, warm, "step")
    np.testing.assert_allclose(_rates(s, [max(warm, 30), 59, 60, 89, 90, 99]),
                               [1.0, 1.0, 0.316, 0.316, 0.316 ** 2, 0.316 ** 2], rtol=1e-6)


def test_default_warmup_is_a_tenth_of_the_steps_at_most_2000():
    """docs/training.md: `--warmup-steps` defaults to min(2000, steps / 10); a given value
    (0 included) is kept."""
    assert [warmup_length(n, None) for n in (9, 10, 300, 1999, 20000, 50000)] == [0, 1, 30, 199, 2000, 2000]
    assert warmup_length(300, 7) == 7 and warmup_length(300, 0) == 0


def test_weight_decay_spares_exactly_the_norm_weights():
    """"weight decay 0.1 (not on norm weights)": every RMSNorm weight, the final `norm` as
    well as the per-layer ones, is exempt; every other parameter (embeddings, projections,
    experts, router, lm_head) is decayed. Decaying the final norm pulls the model's output
    scale toward zero for the whole run."""
    from dsv2_jax import init_model, load_config
    from dsv2_jax.train.step import params_of

    params = params_of(init_model(load_config("tiny", num_hidden_layers=2)))
    norms = {"norm", "input_layernorm", "post_attention_layernorm", "q_a_layernorm", "kv_a_layernorm"}
    mask = {jax.tree_util.keystr(p): bool(v)
            for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert mask["['norm']['weight']"] is False
    exempt = {k for k, v in mask.items() if not v}
    want = {k for k in mask if any(f"['{n}']" in k for n in norms)}
    assert exempt == want
    assert len(exempt) == 1 + 2 * 4  # the final norm and four per layer
    assert mask["['embed_tokens']['weight']"] and mask["['lm_head']['kernel']"]


@pytest.mark.parametrize("warm", [0, 10])
def test_cosine_falls_from_the_peak_to_a_tenth_of_it_over_the_steps_after_warmup(warm):
    """`--schedule cosine` (the default): from the end of the warm-up, half a cosine from the
    peak down to a floor of a tenth of it at the last step, over the steps left after the
    warm-up (over all of them the run would end above its floor), then the floor."""
    peak, total = 2.0, 110
    s = lr_schedule(peak, total, warm, "cosine")
    left = total - warm
    counts = [warm, warm + left // 4, warm + left // 2, total - 1, total, total + 50]

    def want(c):
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(c - warm, left) / left)))

    np.testing.assert_allclose(_rates(s, counts), [want(c) for c in counts], rtol=1e-5)
    np.testing.assert_allclose(_rates(s, [total, total + 50]), [0.1 * peak] * 2, rtol=1e-6)


@pytest.mark.parametrize("kind", ["step", "cosine", "constant"])
def test_a_warmup_longer_than_the_run_is_cut_to_the_run(kind):
    """--warmup-steps beyond --steps warms up over the run's own steps: the rate rises
    linearly from peak / steps at the first step towards the peak, rather than creeping up
    a fraction of the way and ending far below it."""
    peak, total = 1.0, 10
    s = lr_schedule(peak, total, 50, kind)
    np.testing.assert_allclose(_rates(s, range(total)), [peak / total + (peak - peak / total) * c / total for c in range(total)],
                               rtol=1e-6)
