import numpy as np
import pytest
import scipy.stats

from metta_collapse.training.stats import (
    format_interval,
    format_spread,
    level_before_cut,
    paired_difference,
    rliable_summary,
    steps_to_regain,
)


def differences(values: np.ndarray) -> dict:
    """The paired difference of a = b + values against b, where b varies far more across seeds than the values."""
    b = {seed: 100.0 * seed for seed in range(len(values))}
    return paired_difference({seed: b[seed] + value for seed, value in enumerate(values)}, b)


def test_the_interval_holds_the_mean_and_narrows_with_more_seeds():
    widths = []
    for n in (4, 16, 64):
        # n evenly spaced quantiles of N(0.5, 1): the same distribution at every n, without a lucky draw
        result = differences(scipy.stats.norm.ppf((np.arange(n) + 0.5) / n, loc=0.5))
        assert result["n"] == n and result["seeds"] == list(range(n))
        assert result["low"] < result["mean"] < result["high"]
        widths.append(result["high"] - result["low"])
    assert widths[0] > widths[1] > widths[2]
    assert differences(np.arange(8.0)) == differences(np.arange(8.0))  # a fixed seed: the same interval


def test_a_difference_of_one_on_every_seed_excludes_zero_and_noise_around_zero_does_not():
    one = differences(np.ones(5))
    assert one["mean"] == 1.0 and (one["low"], one["high"]) == (1.0, 1.0) and one["excludes_zero"] is True
    noise = differences(np.array([-1.0, 0.8, -0.4, 0.5, 0.2, -0.3, 0.1, 0.1]))
    assert noise["mean"] == pytest.approx(0.0, abs=1e-12)
    assert noise["low"] < 0 < noise["high"] and noise["excludes_zero"] is False


def test_only_shared_seeds_are_paired_and_one_seed_has_no_interval():
    result = paired_difference({0: 3.0, 1: 5.0}, {1: 4.0, 2: 0.0})
    assert result == {"mean": 1.0, "low": None, "high": None, "n": 1, "excludes_zero": None, "seeds": [1]}
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert format_interval(result) == "1 (n=1)" and format_interval(None) == "-"
    assert "±" not in format_spread(0.008656, 0.0, 1) and "(n=1)" in format_spread(0.008656, 0.0, 1)
    assert format_spread(0.0087, 0.0012, 3) == "0.0087 ± 0.0012 (n=3)"
    assert format_spread(-3.5, 1.0, 2, "+.4g") == "-3.5 ± 1 (n=2)"  # no sign on the spread
    interval = differences(np.array([1.0, 2.0, 3.0]))
    assert format_interval(interval, spec=".3g") == f"2 [{interval['low']:.3g}, {interval['high']:.3g}] (n=3)"


def test_rliable_gives_the_interquartile_mean_and_the_probability_of_improvement():
    x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]
    summary = rliable_summary({"y": [-5.0, -4.0, -3.0], "x": x, "single": [7.0]})
    iqm = summary["iqm"]["x"]
    assert iqm["iqm"] == pytest.approx(scipy.stats.trim_mean(np.array(x), 0.25)) and iqm["n"] == 8
    assert iqm["iqm"] != pytest.approx(np.mean(x))  # the outlier is trimmed
    assert iqm["low"] <= iqm["iqm"] <= iqm["high"]
    assert summary["iqm"]["single"] == {"iqm": 7.0, "low": None, "high": None, "n": 1}
    x_over_y, single = summary["probability_of_improvement"]  # every other arm over the first
    assert (x_over_y["x"], x_over_y["y"], x_over_y["probability"]) == ("x", "y", 1.0)  # every run of x beats y
    assert (single["n_x"], single["low"]) == (1, None)
    (even,) = rliable_summary({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]})["probability_of_improvement"]
    assert even["probability"] == 0.5 and even["low"] < 0.5 < even["high"]


def test_steps_to_regain_counts_only_epochs_after_the_cut():
    steps = [100, 200, 300, 400, 500, 600, 700, 800]
    rewards = [10.0, 10.0, 10.0, 0.0, 2.0, 8.0, 8.0, 8.0]  # cut at 300
    level = level_before_cut(steps, rewards, 300, 3)
    assert level == 10.0 and level_before_cut(steps, rewards, 50, 3) is None
    # a 3-epoch window reaching back over the cut would give 6.7 >= 5 at step 400 already
    # after the cut alone: 0, 1, 3.3, then 6 at step 700
    regained = steps_to_regain(steps, rewards, 300, 5.0, 3)
    assert regained == 400 and isinstance(regained, int)
    assert steps_to_regain(steps, rewards, 300, 8.0, 1) == 300
    assert steps_to_regain(steps, rewards, 300, level, 3) is None  # never back to 10
    assert steps_to_regain(steps, rewards, 300, None, 3) is None  # no level of its seed: dropped
