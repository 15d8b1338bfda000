"""densetune.stats against numbers worked out by hand (binomial coefficients, a t table), not against scipy."""

import math

import pytest

from densetune.stats import holm, majority_baseline, mcnemar, mean_interval


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
