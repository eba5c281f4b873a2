"""Short versions of camserve_tools/bench/endurance.py (the full runs and their figures: docs/endurance.md)."""

from __future__ import annotations

import pytest

from camserve_tools.bench.endurance import batch_integrity, serving, soak, worker_kill

pytestmark = [pytest.mark.slow, pytest.mark.serving]


def test_soak_kill_and_batch_integrity_short() -> None:
    with serving() as server:
        soaked = soak(server, total=300, samples=15)
        assert soaked.failures == 0
        assert soaked.growth < 0.05, soaked.curve
        killed = worker_kill(server, duration=20)
        assert killed.recovered_s < 30, killed
        assert killed.slowest_s < 60, killed  # nothing hangs past responseTimeout
        assert killed.failed <= 8, killed  # only requests in flight on the killed worker
    with serving(batch_size=8, max_batch_delay=50) as server:
        mismatched, failed = batch_integrity(server, total=160)
        assert (mismatched, failed) == (0, 0)
