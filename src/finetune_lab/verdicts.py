"""Which configuration is better, and is the difference shown? Pure functions over logged values, shared by the
sweeps (their verdicts, best configuration and registration) and the report.

Two tests, for the two sources of noise in a comparison:

- **Across seeds** (training's noise): Welch's t-test on the metric's value per seed, two configurations with at
  least 2 seeds each: the difference of the means, its 95 % confidence interval and the two-sided p-value.
- **On the held-out examples** (the test set's noise): every configuration of a sweep is evaluated on the same
  split, so the examples pair up, which makes a test even with one seed. Classifiers: McNemar's exact test on which
  examples each gets right; causal LMs: a paired t-test on the per-example held-out losses. A configuration with
  several seeds is pooled per example first: a classifier's probabilities averaged over its seeds (their ensemble,
  a soft majority vote), an LM's per-example losses averaged.

A difference is *shown* when the deciding test rejects "no difference" at the 5 % level: the seeds' test when both
sides have 2 or more seeds with a spread, else the held-out test. A parent that states several comparisons against
its best corrects the deciding p-values for their number (Holm's step-down method); with a single comparison that
is the same as asking the 95 % interval to exclude zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 1 - ALPHA
# The power a planned number of seeds aims for (`seeds_needed`).
POWER = 0.8
WELCH, MCNEMAR, PAIRED_T = "welch_t", "mcnemar_exact", "paired_t"
# Per-example values of a configuration on the held-out split: 1/0 for a classifier's right/wrong answer, the
# mean loss per target token of each example for a causal LM.
CORRECT, LOSS = "correct", "loss"
NOT_CONCLUSIVE = "single seed and no per-example values: not conclusive"
NO_DIFFERENCE = "no difference shown"
ONE_CONFIGURATION = "one configuration only, nothing to compare"
TEST_NAMES = {WELCH: "Welch", MCNEMAR: "McNemar", PAIRED_T: "paired t"}


@dataclass(frozen=True)
class TestResult:
    """One test of `first - second`."""

    test: str
    """`welch_t` (across seeds), `mcnemar_exact` or `paired_t` (on the held-out examples)."""
    difference: float
    """The first side's mean minus the second's, in the metric's units."""
    low: float
    """Lower end of the difference's 95 % confidence interval (NaN where the test gives none: McNemar's)."""
    high: float
    """Upper end of the interval."""
    p_value: float
    """Two-sided p-value of "no difference"; NaN when the data cannot tell (no spread across seeds at all)."""
    n: tuple[int, ...]
    """Seeds on each side (Welch), or the paired examples."""

    @property
    def usable(self) -> bool:
        return not math.isnan(self.p_value)

    def record(self) -> dict:
        return {"test": self.test, "difference": self.difference, "ci95": [_number(self.low), _number(self.high)],
                "p_value": _number(self.p_value), "n": list(self.n)}


def _number(value: float) -> float | None:
    """A number as a record holds it: JSON has no NaN, a missing value is null."""
    return None if math.isnan(value) else value


def across_seeds(first: Sequence[float], second: Sequence[float]) -> TestResult | None:
    """Welch's t-test of the seeds' values of two configurations; None with fewer than 2 seeds on a side. Values
    that do not vary across seeds on either side leave the spread unmeasured: p and interval are NaN."""
    if min(len(first), len(second)) < 2:
        return None
    difference = float(np.mean(first) - np.mean(second))
    if np.ptp(first) == 0 and np.ptp(second) == 0:
        return TestResult(WELCH, difference, math.nan, math.nan, math.nan, (len(first), len(second)))
    result = stats.ttest_ind(first, second, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return TestResult(WELCH, difference, float(interval.low), float(interval.high), float(result.pvalue),
                      (len(first), len(second)))


def mcnemar(first_correct: np.ndarray, second_correct: np.ndarray) -> TestResult:
    """McNemar's exact test: of the examples exactly one of the two classifiers gets right, is either side more
    often the one (a two-sided binomial test at 1/2)? The difference is of the accuracies."""
    first, second = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
    only_first, only_second = int(np.sum(first & ~second)), int(np.sum(~first & second))
    discordant = only_first + only_second
    p_value = stats.binomtest(only_first, discordant, 0.5).pvalue if discordant else 1.0
    return TestResult(MCNEMAR, (only_first - only_second) / len(first), math.nan, math.nan, float(p_value),
                      (len(first),))


def paired_t(first: np.ndarray, second: np.ndarray) -> TestResult:
    """A paired t-test of per-example values (held-out losses): the mean per-example difference, its 95 % interval
    and p-value, over the examples with a value on both sides (an example whose target was truncated away has no
    loss: NaN). Identical values on every example: no difference, p = 1."""
    first, second = np.asarray(first, float), np.asarray(second, float)
    both = np.isfinite(first) & np.isfinite(second)
    first, second = first[both], second[both]
    differences = first - second
    if not differences.any():
        return TestResult(PAIRED_T, 0.0, 0.0, 0.0, 1.0, (len(differences),))
    result = stats.ttest_rel(first, second)
    interval = result.confidence_interval(CONFIDENCE)
    return TestResult(PAIRED_T, float(differences.mean()), float(interval.low), float(interval.high),
                      float(result.pvalue), (len(differences),))


@dataclass(frozen=True)
class HeldOut:
    """A configuration's per-example values on the shared held-out split, its seeds pooled."""

    kind: str
    """`correct` (a classifier: 1 right, 0 wrong) or `loss` (a causal LM: each example's mean loss per token)."""
    values: np.ndarray
    examples: str = ""
    """What identifies the held-out examples (a digest of them): values pair only on the same examples."""


def pooled_classifier(probabilities: Sequence[np.ndarray], labels: np.ndarray, examples: str = "") -> HeldOut:
    """Which held-out examples the seeds' ensemble gets right: each seed's class probabilities (examples x
    classes) averaged, then the most probable class against the label."""
    mean = np.mean(np.stack([np.asarray(p, float) for p in probabilities]), axis=0)
    return HeldOut(CORRECT, (mean.argmax(axis=1) == np.asarray(labels)).astype(float), examples)


def pooled_losses(losses: Sequence[np.ndarray], examples: str = "") -> HeldOut:
    """Each held-out example's loss averaged over the seeds."""
    return HeldOut(LOSS, np.mean(np.stack([np.asarray(x, float) for x in losses]), axis=0), examples)


def paired(first: HeldOut, second: HeldOut) -> TestResult | None:
    """The held-out test of two configurations (None if their values do not pair: other examples or kinds)."""
    if (first.kind, first.examples, first.values.shape) != (second.kind, second.examples, second.values.shape):
        return None
    return (mcnemar if first.kind == CORRECT else paired_t)(first.values, second.values)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones are not tested and stay NaN): the smallest is
    multiplied by the family's size, the next by one less, and so on, each at least the one before, at most 1."""
    tested = sorted((p, k) for k, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, k) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[k] = running
    return adjusted


def seeds_needed(difference: float, std: float, power: float = POWER, limit: int = 1000) -> int | None:
    """Seeds per configuration for Welch's test at the 5 % level to show a true `difference` with probability
    `power`, when each seed's value varies by `std` (a two-sample t-test's power, from the noncentral t
    distribution); None beyond `limit` or when either is zero."""
    if difference == 0 or not std > 0:
        return None
    for n in range(2, limit + 1):
        freedom = 2 * n - 2
        critical = stats.t.ppf(1 - ALPHA / 2, freedom)
        shift = abs(difference) / (std * math.sqrt(2 / n))
        if stats.nct.sf(critical, freedom, shift) + stats.nct.cdf(-critical, freedom, shift) >= power:
            return n
    return None


@dataclass(frozen=True)
class Verdict:
    """Configuration `name` against `reference` (the best) on `metric`."""

    metric: str
    lower_is_better: bool
    name: str
    reference: str
    mean: float
    reference_mean: float
    seeds: TestResult | None
    """Across seeds (Welch), when both sides have 2 or more."""
    held_out: TestResult | None
    """On the held-out examples, when both sides logged per-example values."""
    comparisons: int
    """How many comparisons the parent states against its best (Holm's family)."""
    adjusted_p: float
    """The deciding test's p-value, Holm-adjusted for `comparisons` (NaN when no test decides)."""
    seeds_needed: int | None = None
    """Seeds per side for Welch's test to show this difference 4 times in 5, were it the true one, at the seeds'
    spread seen here (`seeds_needed`); None without a spread."""

    @property
    def decided_by(self) -> str:
        """`seeds`, `held_out`, or "" when neither test can decide."""
        if self.seeds is not None and self.seeds.usable:
            return "seeds"
        return "held_out" if self.held_out is not None else ""

    @property
    def shown(self) -> bool:
        return self.adjusted_p < ALPHA

    @property
    def winner(self) -> str:
        """The configuration shown better ("" when no difference is shown), on the side the deciding test found:
        the held-out test's direction is its own (the per-example values: right answers, or each example's loss
        with every example weighing the same), which the metric's means (a loss weighted by tokens) may not share."""
        if not self.shown:
            return ""
        if self.decided_by == "held_out":
            ahead = self.held_out.difference > 0 if self.held_out.test == MCNEMAR else self.held_out.difference < 0
        else:
            ahead = (self.mean < self.reference_mean) == self.lower_is_better
        return self.name if ahead else self.reference

    @property
    def conclusion(self) -> str:
        if not self.decided_by:
            return NOT_CONCLUSIVE
        if not self.shown:
            return NO_DIFFERENCE
        unmeasured = " (on these held-out examples; training noise unmeasured)" if self.decided_by == "held_out" \
            else ""
        return f"{self.winner} is better{unmeasured}"

    def line(self) -> str:
        """`a vs b: accuracy 0.9 vs 0.9094 (difference -0.0094, 95 % CI [-0.052, 0.033], Welch p = 0.35 over 2 and 2
        seeds; held-out McNemar p = 0.8 over 160 examples): no difference shown`."""
        parts = [f"difference {self.mean - self.reference_mean:+.2g}"]
        if self.seeds is None:
            parts.append("single seed: training noise unmeasured")
        elif not self.seeds.usable:
            parts.append(f"no spread over {self.seeds.n[0]} and {self.seeds.n[1]} seeds: training noise unmeasured")
        else:
            parts.append(f"95 % CI [{self.seeds.low:.2g}, {self.seeds.high:.2g}], Welch p = "
                         f"{self.seeds.p_value:.2g} over {self.seeds.n[0]} and {self.seeds.n[1]} seeds")
        text = ", ".join(parts)
        if self.held_out is not None:
            interval = "" if math.isnan(self.held_out.low) else \
                f", 95 % CI [{self.held_out.low:.2g}, {self.held_out.high:.2g}]"
            text += (f"; held-out {TEST_NAMES[self.held_out.test]} p = {self.held_out.p_value:.2g}{interval} over "
                     f"{self.held_out.n[0]} examples")
        if self.comparisons > 1 and self.decided_by:
            text += f"; Holm-adjusted p = {self.adjusted_p:.2g} over {self.comparisons} comparisons"
        return (f"{self.name} vs {self.reference}: {self.metric} {self.mean:.4g} vs {self.reference_mean:.4g} "
                f"({text}): {self.conclusion}")

    def record(self) -> dict:
        """The verdict's numbers, as a parent's `verdicts.json` holds them (a value a test does not give: null)."""
        return {
            "configuration": self.name, "reference": self.reference, "metric": self.metric,
            "lower_is_better": self.lower_is_better, "mean": self.mean, "reference_mean": self.reference_mean,
            "difference": self.mean - self.reference_mean,
            "seeds": self.seeds.record() if self.seeds else None,
            "held_out": self.held_out.record() if self.held_out else None,
            "decided_by": self.decided_by, "comparisons": self.comparisons, "adjusted_p": _number(self.adjusted_p),
            "correction": "holm" if self.comparisons > 1 else "none",
            "shown": self.shown, "winner": self.winner, "conclusion": self.conclusion, "line": self.line(),
            "seeds_needed": self.seeds_needed,
        }


def compare(groups: dict[str, list[float]], metric: str, lower_is_better: bool, reference: str = "",
            held_out: dict[str, HeldOut] | None = None) -> list[Verdict]:
    """Every configuration of `groups` (name → the metric's value per seed) against `reference` (default: the best
    mean), in the order of `groups`; `held_out`: the configurations' pooled per-example values, where logged.
    The deciding p-values are Holm-adjusted over the comparisons made."""
    groups = {name: list(values) for name, values in groups.items() if values}
    held_out = held_out or {}
    means = {name: float(np.mean(values)) for name, values in groups.items()}
    if reference not in groups and means:
        reference = (min if lower_is_better else max)(means, key=means.get)
    others = [name for name in groups if name != reference]
    tests = []
    for name in others:
        seeds = across_seeds(groups[name], groups[reference])
        pair = paired(held_out[name], held_out[reference]) if name in held_out and reference in held_out else None
        tests.append((seeds, pair))
    deciding = [seeds.p_value if seeds is not None and seeds.usable else pair.p_value if pair is not None
                else math.nan for seeds, pair in tests]
    adjusted = holm(deciding)
    return [Verdict(metric, lower_is_better, name, reference, means[name], means[reference], seeds, pair,
                    len(others), p, _seeds_needed(groups[name], groups[reference]))
            for name, (seeds, pair), p in zip(others, tests, adjusted)]


def _seeds_needed(first: list[float], second: list[float]) -> int | None:
    """`seeds_needed` for the difference of the means at the two sides' pooled standard deviation."""
    if min(len(first), len(second)) < 2:
        return None
    spread = math.sqrt((np.var(first, ddof=1) + np.var(second, ddof=1)) / 2)
    return seeds_needed(float(np.mean(first) - np.mean(second)), spread)


@dataclass(frozen=True)
class Family:
    """The verdicts a parent states together, one Holm family: every configuration against the reference."""

    title: str
    """What the family holds, like `rank 8` (methods compared at one rank); "" for a parent's single family."""
    metric: str
    configurations: int
    """How many configurations were measured (0: nothing to say; 1: nothing to compare)."""
    verdicts: list[Verdict]
    """The runner-up's verdict first (when the reference is the best), then the others in their given order."""

    def lines(self) -> list[str]:
        """One line per verdict (the title before it), or the one saying there is nothing to compare."""
        if not self.configurations:
            return []
        texts = [v.line() for v in self.verdicts] or [f"{self.metric}: {ONE_CONFIGURATION}"]
        return [f"{self.title}: {text}" if self.title else text for text in texts]

    def records(self) -> list[dict]:
        """Every verdict's numbers (`Verdict.record`) with the family's title, as `verdicts.json` holds them."""
        return [{"family": self.title, **v.record()} for v in self.verdicts]


def family(groups: dict[str, list[float]], metric: str, lower_is_better: bool, reference: str = "",
           held_out: dict[str, HeldOut] | None = None, title: str = "") -> Family:
    """`compare` as a parent states it: with the reference the best mean (not named, or named and the best), the
    runner-up's verdict goes first, since it says whether the best is shown ahead at all."""
    found = compare(groups, metric, lower_is_better, reference, held_out)
    measured = [name for name, values in groups.items() if values]
    if found and all((found[0].reference_mean <= v.mean) if lower_is_better else (found[0].reference_mean >= v.mean)
                     for v in found):
        runner_up = (min if lower_is_better else max)(found, key=lambda v: v.mean)
        found = [runner_up, *(v for v in found if v is not runner_up)]
    return Family(title, metric, len(measured), found)
