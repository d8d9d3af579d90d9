"""The frontier's reading: which fixed configurations an adaptive one dominates, and the goal."""
from reuse_exp.tiny.frontier import dominated_by, frontier_table
from reuse_exp.tiny.table import EvalResult


def result(correct: int, skipped: float, n: int = 10, texts=None) -> EvalResult:
    return EvalResult([i < correct for i in range(n)], texts or [str(i) for i in range(n)], 100, 1.0, skipped)


def test_dominance_needs_at_least_the_skip_and_more_accuracy():
    results = {"k=1": result(10, 0.0), "output k=2 first": result(9, 0.05), "delta k=3 last": result(8, 0.4),
               "adaptive delta 1": result(10, 0.3)}
    assert dominated_by(results, "output k=2 first") == ["adaptive delta 1"]
    assert dominated_by(results, "delta k=3 last") == []          # skips more than the adaptive one
    results["adaptive delta 2"] = result(8, 0.5)
    assert dominated_by(results, "delta k=3 last") == []          # skips more, but is not more accurate


def test_the_goal_line_says_which_threshold_met_it():
    base = {"k=1": result(10, 0.0), "output k=2 first": result(9, 0.05)}
    met = frontier_table({**base, "adaptive replay 1": result(10, 0.31)}, 0.25, 10)
    assert "met by adaptive replay 1." in met and "no adaptive one dominates (skips at least as much, more " \
        "accurate): none." in met
    missed = frontier_table({**base, "adaptive replay 1": result(9, 0.31), "adaptive delta 1": result(10, 0.2)},
                            0.25, 10)
    assert "not met by any threshold measured" in missed
    assert "| adaptive replay 1 | 0.310 |" in missed and "-10.0 pt" in missed
