"""The stopping/selection rule on synthetic evaluation sequences."""
from dupfast.purification.stopping import StoppingRule


def feed(rule, seq):
    out = []
    for step, (agree, acc) in enumerate(seq, start=1):
        improved, reason = rule.update({"step": step, "agree": agree, "acc": acc})
        out.append((improved, reason))
        if reason:
            break
    return out


def test_stops_at_the_first_admissible_state_under_the_bound():
    rule = StoppingRule(agree0=1.0, acc0=0.90, agree_bound=0.1, acc_tolerance=0.03)
    # step 3 is under the bound but loses 5 points of clean accuracy: not admissible, go on
    out = feed(rule, [(1.0, 0.90), (0.5, 0.89), (0.08, 0.85), (0.09, 0.88), (0.01, 0.90)])
    assert len(out) == 4 and "0.090 <= 0.1" in out[-1][1]
    assert rule.best["step"] == 4 and rule.best["admissible"]


def test_selection_prefers_lower_agreement_then_higher_accuracy():
    rule = StoppingRule(agree0=1.0, acc0=0.90, agree_bound=0.0, acc_tolerance=0.03)
    feed(rule, [(0.4, 0.88), (0.3, 0.87), (0.3, 0.89), (0.2, 0.80)])
    assert rule.best["step"] == 3  # (0.3, 0.89) beats (0.3, 0.87); (0.2, 0.80) is not admissible


def test_patience_waits_for_the_student_to_leave_the_tie():
    rule = StoppingRule(agree0=1.0, acc0=0.90, agree_bound=0.05, acc_tolerance=0.03, patience=2)
    # on the tie (agreement still 1.0, even with a better accuracy) patience does not run
    out = feed(rule, [(1.0, 0.91), (1.0, 0.90), (1.0, 0.90), (1.0, 0.89)])
    assert all(reason is None for _, reason in out)
    out = feed(rule, [(0.5, 0.90), (0.6, 0.90), (0.5, 0.90)])
    assert out[-1][1] == "no lower admissible agreement in 2 evaluations"
    assert rule.best["agree"] == 0.5


def test_nothing_admissible_keeps_the_teacher():
    rule = StoppingRule(agree0=1.0, acc0=0.90, agree_bound=0.1, acc_tolerance=0.02)
    out = feed(rule, [(0.5, 0.85), (0.05, 0.80)])
    assert all(reason is None for _, reason in out)
    assert rule.best == {"step": 0, "agree": 1.0, "acc": 0.90, "admissible": True}
