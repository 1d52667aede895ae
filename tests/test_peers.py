"""benchmarks/peers.py reports each engine's best round: the fastest of its rounds'
medians for each timing, rounds that failed left out, an error only where none ran."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import peers  # noqa: E402


def test_each_timing_is_the_best_of_the_rounds_that_ran():
    rounds = [
        {"seconds": 0.08, "run_into_seconds": 0.07},
        {"error": "killed"},
        {"seconds": 0.02, "run_into_seconds": 0.09},
    ]
    best = peers._best_of(rounds)
    assert best["seconds"] == 0.02 and best["run_into_seconds"] == 0.07
    assert best["rounds"] == rounds


def test_a_peer_has_only_the_timings_it_reported():
    assert set(peers._best_of([{"seconds": 0.5}, {"seconds": 0.4}])) == {"seconds", "rounds"}


def test_an_engine_that_never_ran_reports_its_error():
    assert peers._best_of([{"error": "no module"}, {"error": "no module"}]) == {"error": "no module"}
