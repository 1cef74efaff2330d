"""Claims: each is recorded with its evidence, reported held / not held, and saved as a boolean metric."""

import numpy as np
import pandas as pd
import pytest

from labhelpers.claims import Claims


def test_claims_report_held_and_not_held_with_their_evidence(capsys):
    claim = Claims()
    claim("replay_forgets_less", "Replay keeps more arithmetic than naive fine-tuning", np.float64(0.6) > 0.4,
          "replay 0.60, naive 0.40")
    claim("ewc_beats_l2", "EWC keeps more than L2", 0.3 > 0.5, "EWC 0.30, L2 0.50")
    printed = capsys.readouterr().out
    assert "held: Replay keeps more arithmetic than naive fine-tuning (replay 0.60, naive 0.40)" in printed
    assert "NOT held: EWC keeps more than L2 (EWC 0.30, L2 0.50)" in printed
    table = claim.table()
    assert list(table["held"]) == ["held", "NOT held"] and list(table.columns) == ["claim", "held", "evidence"]
    assert claim.metrics() == {"claim_replay_forgets_less": True, "claim_ewc_beats_l2": False}
    assert all(type(v) is bool for v in claim.metrics().values())  # JSON booleans, not numpy ones


def test_a_claim_checked_again_replaces_its_earlier_result():
    claim = Claims()
    claim("a", "first", False, "x")
    claim("b", "second", True, "y")
    claim("a", "first", True, "z")
    assert len(claim) == 2 and claim.metrics() == {"claim_b": True, "claim_a": True}
    assert claim.table()["evidence"].tolist() == ["y", "z"]


def test_bad_keys_and_ambiguous_truth_values_are_refused_with_the_fix():
    claim = Claims()
    with pytest.raises(ValueError, match="lower case letters"):
        claim("Replay forgets less", "x", True, "")
    with pytest.raises(TypeError, match=r"\.all\(\) or \.any\(\)"):
        claim("series", "x", pd.Series([True, False]) > 0, "")
    with pytest.raises(TypeError, match="truth value"):
        claim("text", "x", "yes", "")
    assert len(claim) == 0 and claim.table().empty


def test_higher_holds_only_beyond_the_95_percent_intervals(capsys):
    claim = Claims()
    assert claim.higher("clear", "tuned beats base", {"tuned": 0.9, "base": 0.1}, n=40).held
    close = claim.higher("close", "tuned beats base", {"tuned": 0.55, "base": 0.45}, n=40)
    assert not close.held and "within the 95% intervals" in close.evidence
    assert "tuned 0.55 [0.40, 0.69] vs base 0.45 [0.31, 0.60], n=40" in close.evidence
    assert not claim.higher("wrong_way", "base beats tuned", {"base": 0.1, "tuned": 0.9}, n=40).held
    with pytest.raises(ValueError, match="compares two scores"):
        claim.higher("three", "x", {"a": 0.1, "b": 0.2, "c": 0.3}, n=10)
