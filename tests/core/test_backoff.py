"""comfy_sidecar.net.backoff: the one retry-delay formula."""

from __future__ import annotations

import pytest

from comfy_sidecar.net.backoff import backoff_delay


def test_doubles_from_base_up_to_cap_without_jitter() -> None:
    delays = [backoff_delay(n, 0.1, 2.0) for n in range(1, 9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_jitter_shortens_by_at_most_the_fraction() -> None:
    # rng() == 0 gives the full delay, rng() -> 1 gives (1 - jitter) of it.
    assert backoff_delay(3, 1.0, 30.0, 0.25, rng=lambda: 0.0) == 4.0
    assert backoff_delay(3, 1.0, 30.0, 0.25, rng=lambda: 0.999999) == pytest.approx(3.0, 1e-5)
    assert backoff_delay(3, 1.0, 30.0, 0.25, rng=lambda: 0.5) == 3.5
    assert backoff_delay(10, 1.0, 30.0, 0.25, rng=lambda: 0.0) == 30.0  # capped first


def test_default_rng_stays_in_range() -> None:
    for attempt in range(1, 12):
        full = min(30.0, 2.0 ** (attempt - 1))
        for _ in range(50):
            assert 0.75 * full <= backoff_delay(attempt, 1.0, 30.0, 0.25) <= full


def test_huge_attempt_numbers_give_the_cap() -> None:
    assert backoff_delay(10**6, 1.0, 60.0) == 60.0
    assert backoff_delay(2000, 0.5, 36.0, 0.5, rng=lambda: 0.0) == 36.0


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "jitter"),
    [(0, 1.0, 2.0, 0.0), (1, -1.0, 2.0, 0.0), (1, 1.0, -2.0, 0.0), (1, 1.0, 2.0, 1.5)],
)
def test_bad_arguments(attempt: int, base_s: float, cap_s: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, base_s, cap_s, jitter)


def test_restart_parameters_spread_twenty_percent_either_side() -> None:
    # What service.Sidecar uses: 0.5 s doubling to 30 s, times a factor in [0.8, 1.2].
    def restart(n: int, r: float) -> float:
        return backoff_delay(n, 0.5 * 1.2, 30.0 * 1.2, jitter=1 - 0.8 / 1.2, rng=lambda: r)

    for n in range(1, 12):
        nominal = min(30.0, 0.5 * 2 ** (n - 1))
        assert restart(n, 0.0) == pytest.approx(1.2 * nominal)
        assert restart(n, 1.0) == pytest.approx(0.8 * nominal)
