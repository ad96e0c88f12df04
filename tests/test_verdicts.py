"""The verdict statistics against known values: scipy's tests computed independently, textbook cases (McNemar,
Holm, the seeds a difference needs), and the headline classify_sweep verdict of docs/sweeps.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from finetune_lab import verdicts

# docs/sweeps.md's classify_sweep (MiniLM-L6 on the embedded reviews, 160 held out): accuracy per seed of
# lr 5e-5 x 2 epochs and lr 1e-4 x 2 epochs.
LOWER_RATE, HIGHER_RATE = [143 / 160, 145 / 160], [146 / 160, 145 / 160]


def test_the_headline_sweep_verdict_shows_no_difference():
    (verdict,) = verdicts.compare({"lr5e-05": LOWER_RATE, "lr0.0001": HIGHER_RATE}, "accuracy", False)
    assert (verdict.name, verdict.reference) == ("lr5e-05", "lr0.0001")
    seeds = verdict.seeds
    assert seeds.difference == pytest.approx(-0.009375)
    assert seeds.p_value == pytest.approx(0.3499, abs=1e-4)
    assert (seeds.low, seeds.high) == pytest.approx((-0.0526, 0.0339), abs=1e-4)
    assert not verdict.shown and verdict.winner == "" and verdict.decided_by == "seeds"
    assert verdict.line() == ("lr5e-05 vs lr0.0001: accuracy 0.9 vs 0.9094 (difference -0.0094, 95 % CI [-0.053, "
                              "0.034], Welch p = 0.35 over 2 and 2 seeds): no difference shown")


def test_welch_matches_scipy_and_its_t_statistic():
    result = stats.ttest_ind(LOWER_RATE, HIGHER_RATE, equal_var=False)
    assert result.statistic == pytest.approx(-1.3416, abs=1e-4) and result.df == pytest.approx(1.47, abs=0.01)
    tested = verdicts.across_seeds(LOWER_RATE, HIGHER_RATE)
    assert tested.p_value == result.pvalue and tested.n == (2, 2)


def test_a_clear_difference_over_seeds_is_shown_with_its_winner():
    high, low = [0.91, 0.92, 0.93], [0.80, 0.81, 0.79]
    (verdict,) = verdicts.compare({"low": low, "high": high}, "accuracy", False)
    assert verdict.shown and verdict.winner == "high" and verdict.seeds.high < 0
    assert verdict.line().endswith(": high is better")
    (loss,) = verdicts.compare({"a": [1.0, 1.1, 1.05], "b": [2.0, 2.1, 2.05]}, "eval_loss", True)
    assert loss.reference == "a" and loss.winner == "a"


def test_fewer_than_two_seeds_or_no_spread_leave_the_seeds_test_out():
    assert verdicts.across_seeds([0.9], [0.8, 0.85]) is None
    flat = verdicts.across_seeds([0.8187, 0.8187], [0.9, 0.9])
    assert not flat.usable and math.isnan(flat.p_value)
    (verdict,) = verdicts.compare({"a": [0.8187, 0.8187], "b": [0.9, 0.9]}, "accuracy", False)
    assert verdict.decided_by == "" and not verdict.shown and verdict.conclusion == verdicts.NOT_CONCLUSIVE
    assert "no spread over 2 and 2 seeds" in verdict.line()
    assert verdict.record()["seeds"]["p_value"] is None and verdict.record()["adjusted_p"] is None, "JSON has no NaN"


def test_mcnemar_exact_matches_the_binomial_test_on_discordant_pairs():
    # 10 examples only the first gets right, 2 only the second, 148 both or neither
    first = np.array([1] * 10 + [0] * 2 + [1] * 100 + [0] * 48)
    second = np.array([0] * 10 + [1] * 2 + [1] * 100 + [0] * 48)
    tested = verdicts.mcnemar(first, second)
    assert tested.p_value == pytest.approx(2 * stats.binom.cdf(2, 12, 0.5))
    assert tested.p_value == pytest.approx(0.03857, abs=1e-5)
    assert tested.difference == pytest.approx(8 / 160) and tested.n == (160,)
    assert verdicts.mcnemar(first, first).p_value == 1.0


def test_paired_t_matches_scipy_and_identical_losses_differ_by_nothing():
    rng = np.random.default_rng(0)
    first = rng.gamma(2.0, 1.0, 50)
    second = first + rng.normal(0.1, 0.3, 50)
    tested = verdicts.paired_t(first, second)
    expected = stats.ttest_rel(first, second)
    assert tested.p_value == pytest.approx(expected.pvalue)
    assert (tested.low, tested.high) == pytest.approx(tuple(expected.confidence_interval(0.95)))
    assert tested.difference == pytest.approx(np.mean(first - second))
    same = verdicts.paired_t(first, first)
    assert (same.difference, same.p_value) == (0.0, 1.0)


def test_one_seed_is_decided_on_the_held_out_examples_and_says_training_noise_is_unmeasured():
    first = np.array([1.0] * 40 + [0.0] * 120)
    second = np.array([0.0] * 40 + [0.0] * 120)
    held_out = {"a": verdicts.HeldOut(verdicts.CORRECT, first), "b": verdicts.HeldOut(verdicts.CORRECT, second)}
    (verdict,) = verdicts.compare({"a": [0.25], "b": [0.0]}, "accuracy", False, held_out=held_out)
    assert verdict.decided_by == "held_out" and verdict.winner == "a"
    assert verdict.line().endswith("a is better (on these held-out examples; training noise unmeasured)")
    assert "single seed: training noise unmeasured; held-out McNemar p = 1.8e-12 over 160 examples" in verdict.line()
    (alone,) = verdicts.compare({"a": [0.25], "b": [0.0]}, "accuracy", False)
    assert alone.conclusion == verdicts.NOT_CONCLUSIVE and not alone.shown


def test_holm_adjusts_step_down_and_is_said_in_the_line():
    assert verdicts.holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)
    assert verdicts.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    groups = {"best": [0.90, 0.91, 0.92], "close": [0.89, 0.905, 0.91], "far": [0.70, 0.71, 0.72]}
    found = {v.name: v for v in verdicts.compare(groups, "accuracy", False)}
    raw = {name: verdicts.across_seeds(groups[name], groups["best"]).p_value for name in ("close", "far")}
    low, high = sorted(raw.values())
    assert found["far"].adjusted_p == pytest.approx(2 * low) and found["close"].adjusted_p == pytest.approx(
        max(2 * low, high))
    assert "Holm-adjusted p" in found["far"].line() and "over 2 comparisons" in found["far"].line()
    assert found["far"].record()["correction"] == "holm"


def test_seeds_are_pooled_per_example():
    labels = np.array([0, 1, 1])
    seed1 = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    seed2 = np.array([[0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    pooled = verdicts.pooled_classifier([seed1, seed2], labels)
    assert pooled.values.tolist() == [1.0, 1.0, 1.0]  # example 2: 0.45 vs 0.55 on average, right
    losses = verdicts.pooled_losses([np.array([1.0, 2.0]), np.array([3.0, 4.0])])
    assert losses.values.tolist() == [2.0, 3.0] and losses.kind == verdicts.LOSS
    assert verdicts.paired(losses, pooled) is None  # another kind of value does not pair


def test_seeds_needed_follows_the_t_tests_power():
    # two-sided 5 %, 80 % power: an effect of one standard deviation needs 17 a side, half of one 64 (Cohen's tables)
    assert verdicts.seeds_needed(1.0, 1.0) == 17
    assert verdicts.seeds_needed(0.5, 1.0) == 64
    assert verdicts.seeds_needed(0.0, 1.0) is None and verdicts.seeds_needed(1.0, 0.0) is None


def test_the_record_holds_the_numbers_of_the_line():
    (verdict,) = verdicts.compare({"lr5e-05": LOWER_RATE, "lr0.0001": HIGHER_RATE}, "accuracy", False)
    record = verdict.record()
    assert record["seeds"]["test"] == "welch_t" and record["seeds"]["n"] == [2, 2]
    assert record["seeds"]["ci95"] == pytest.approx([-0.0526, 0.0339], abs=1e-4)
    assert record["shown"] is False and record["correction"] == "none" and record["line"] == verdict.line()
    assert record["seeds_needed"] == verdicts.seeds_needed(-0.009375, math.sqrt(
        (np.var(LOWER_RATE, ddof=1) + np.var(HIGHER_RATE, ddof=1)) / 2))


def test_values_on_other_examples_do_not_pair():
    same = np.array([1.0, 0.0, 1.0])
    first, second = verdicts.HeldOut(verdicts.CORRECT, same, "split-a"), verdicts.HeldOut(verdicts.CORRECT, same, "b")
    assert verdicts.paired(first, second) is None
    (verdict,) = verdicts.compare({"a": [0.6], "b": [0.5]}, "accuracy", False, held_out={"a": first, "b": second})
    assert verdict.held_out is None and verdict.conclusion == verdicts.NOT_CONCLUSIVE
    assert verdicts.paired(first, verdicts.HeldOut(verdicts.CORRECT, same, "split-a")).p_value == 1.0


def test_paired_t_leaves_out_examples_without_a_loss():
    """An example whose target tokens were all truncated away has no loss (NaN) on either side."""
    rng = np.random.default_rng(1)
    first, second = rng.gamma(2.0, 1.0, 30), rng.gamma(2.0, 1.0, 30)
    first[[3, 7]] = second[[3, 7]] = np.nan
    tested = verdicts.paired_t(first, second)
    kept = np.isfinite(first)
    assert tested.n == (28,) and tested.p_value == pytest.approx(stats.ttest_rel(first[kept], second[kept]).pvalue)


def test_a_held_out_verdict_names_the_side_its_test_found():
    """One seed each: the paired test decides. Its per-example losses weigh every example the same, the logged
    eval_loss weighs tokens: here the eval losses favour `a`, while `b` has the lower loss on 90 of 100 examples."""
    rng = np.random.default_rng(2)
    a = rng.uniform(2.0, 3.0, 100)
    b = a - 0.2 + rng.normal(0, 0.05, 100)
    b[:10] += 1.0  # ten (long) examples that `b` gets worse
    held_out = {"a": verdicts.HeldOut(verdicts.LOSS, a), "b": verdicts.HeldOut(verdicts.LOSS, b)}
    (verdict,) = verdicts.compare({"a": [2.40], "b": [2.45]}, "eval_loss", True, reference="a", held_out=held_out)
    assert verdict.name == "b" and verdict.held_out.difference < 0 and verdict.held_out.p_value < 0.05
    assert verdict.winner == "b" and verdict.line().endswith(": b is better (on these held-out examples; training "
                                                             "noise unmeasured)")


def test_a_family_leads_with_the_runner_up_and_says_when_there_is_nothing_to_compare():
    groups = {"far": [0.70, 0.71, 0.72], "best": [0.90, 0.91, 0.92], "close": [0.89, 0.905, 0.91]}
    found = verdicts.family(groups, "accuracy", False, title="rank 8")
    assert [v.name for v in found.verdicts] == ["close", "far"] and found.configurations == 3
    assert found.lines()[0].startswith("rank 8: close vs best: accuracy")
    assert [r["family"] for r in found.records()] == ["rank 8", "rank 8"]
    assert found.records()[1]["configuration"] == "far" and found.records()[1]["comparisons"] == 2
    assert verdicts.family({"only": [0.9, 0.8]}, "accuracy", False).lines() == [
        "accuracy: one configuration only, nothing to compare"]
    assert verdicts.family({"none": []}, "accuracy", False).lines() == [] == verdicts.family({}, "x", True).lines()
    # a named reference that is not the best (a probe's `before`) keeps the given order
    named = verdicts.family({"before": [3.0], "after-r1": [2.5], "after-r8": [2.0]}, "target_nll", True, "before")
    assert [v.name for v in named.verdicts] == ["after-r1", "after-r8"]
