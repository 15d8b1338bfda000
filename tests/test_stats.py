"""densetune.results.stats against numbers worked out by hand (binomial coefficients, a t table), not against scipy."""

import math

import pytest

from densetune.results.stats import detectable_difference, holm, majority_baseline, mcnemar, mean_interval


def paired(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_mean_interval_of_three_values():
    mean, half_width = mean_interval([1, 2, 3])
    # s = 1, t(0.975, 2 dof) = 4.303 in the table: 4.303 / sqrt(3)
    assert mean == 2
    assert half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert half_width == pytest.approx(2.4841, abs=1e-4)


def test_mean_interval_of_one_value_has_no_interval():
    mean, half_width = mean_interval([0.25])
    assert mean == 0.25 and math.isnan(half_width)


def test_mean_interval_at_another_confidence():
    # t(0.95, 1 dof) = 6.314; values 0 and 2: mean 1, s = sqrt(2)
    mean, half_width = mean_interval([0, 2], confidence=0.90)
    assert mean == 1
    assert half_width == pytest.approx(6.314 * math.sqrt(2) / math.sqrt(2), abs=1e-3)


def test_mean_interval_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        mean_interval([])


@pytest.mark.parametrize(
    "a_only, b_only, p",
    [
        (1, 6, 2 * (1 + 7) / 2**7),  # 0.125
        (6, 1, 2 * (1 + 7) / 2**7),  # symmetric
        (0, 5, 2 * 1 / 2**5),  # 0.0625
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 0.109375
        (3, 3, 1.0),  # 2 * 42/64 > 1, capped
        (0, 0, 1.0),  # no discordant question
    ],
)
def test_mcnemar_exact_p(a_only, b_only, p):
    result = mcnemar(*paired(both=10, a_only=a_only, b_only=b_only, neither=4))
    assert result.p == pytest.approx(p, abs=1e-12)
    assert (result.n, result.both, result.a_only, result.b_only, result.neither) == (
        14 + a_only + b_only, 10, a_only, b_only, 4
    )


def test_mcnemar_counts_in_question_order():
    result = mcnemar([True, False, True, False], [True, True, False, False])
    assert (result.both, result.a_only, result.b_only, result.neither) == (1, 1, 1, 1)


def test_mcnemar_rejects_different_lengths():
    with pytest.raises(ValueError, match="3 answers against 2"):
        mcnemar([True, False, True], [True, False])


def power_of_ten_discordant(q: float) -> float:
    """The rejection probability of the exact test at 0.05 with 10 discordant questions, a_only ~ binomial(10, q).

    The smallest p: 0 or 10 for a_only gives 2 * 1/1024, 1 or 9 gives 2 * (1 + 10)/1024 = 0.0215, 2 or 8 gives
    2 * (1 + 10 + 45)/1024 = 0.109: it rejects iff min(a_only, b_only) <= 1."""
    return sum(math.comb(10, k) * q**k * (1 - q) ** (10 - k) for k in range(11) if min(k, 10 - k) <= 1)


def test_detectable_difference_with_ten_discordant_questions():
    assert 2 * 11 / 1024 <= 0.05 < 2 * 56 / 1024
    low, high = 0.5, 1.0  # the power grows with q on [1/2, 1]: bisect for 80 %
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if power_of_ten_discordant(middle) >= 0.8 else (middle, high)
    assert high == pytest.approx(0.916740, abs=1e-6)
    # a_only - b_only = (2q - 1) * 10 of 200 questions: 4.17 points
    assert detectable_difference(200, 10) == pytest.approx((2 * high - 1) * 10 / 200, abs=1e-4)
    assert detectable_difference(200, 10) == pytest.approx(0.041674, abs=1e-5)


def test_detectable_difference_is_infinite_when_the_test_cannot_reject():
    assert detectable_difference(100, 0) == math.inf
    # five discordant questions: the most lopsided split has p = 2/32 = 0.0625 > 0.05
    assert detectable_difference(100, 5) == math.inf
    # six: 2/64 = 0.031 <= 0.05 rejects the splits 6-0 and 0-6 only, with probability q^6 + (1 - q)^6; the second term
    # is below 1e-8 near q = 0.8^(1/6)
    assert detectable_difference(100, 6) == pytest.approx((2 * 0.8 ** (1 / 6) - 1) * 6 / 100, abs=1e-6)


def test_detectable_difference_scales_with_the_questions_not_monotone_in_the_discordant():
    # at fixed D the condition is on q alone, and delta = (2q - 1) * D / n: doubling n halves it exactly
    assert detectable_difference(400, 10) == detectable_difference(200, 10) / 2
    # more discordant questions need a larger difference overall (about sqrt(D) / n) ...
    assert detectable_difference(200, 40) > detectable_difference(200, 10)
    # ... but not at every step: the rejection region grows by whole splits, 8 -> 9 widens it (p(1 of 9) = 0.039)
    assert detectable_difference(200, 9) < detectable_difference(200, 8)


def test_detectable_difference_shrinks_with_a_larger_alpha():
    levels = [0.01, 0.05, 0.1, 0.5]
    found = [detectable_difference(100, 20, alpha) for alpha in levels]
    assert found == sorted(found, reverse=True) and found[0] > found[-1]
    assert detectable_difference(100, 20, alpha=0.9, power=0.5) == 0  # the size already exceeds the power


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((0, 0), "n = 0"),
        ((10, 11), "discordant = 11"),
        ((10, -1), "discordant = -1"),
        ((10, 5, 0.0), "alpha = 0.0"),
        ((10, 5, 0.05, 1.0), "power = 1.0"),
    ],
)
def test_detectable_difference_rejects_bad_inputs(arguments, message):
    with pytest.raises(ValueError, match=message) as error:
        detectable_difference(*arguments)
    assert "\n" not in str(error.value)


def test_holm_known_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_keeps_order():
    assert holm([0.6, 0.5]) == [1.0, 1.0]
    assert holm([0.2]) == [0.2]
    assert holm([]) == []


def test_majority_baseline():
    assert majority_baseline(["true", "false", "true", "true"]) == ("true", 0.75)
    assert majority_baseline(["b", "a", "a", "b"]) == ("b", 0.5)  # equals: the first met
    with pytest.raises(ValueError):
        majority_baseline([])
