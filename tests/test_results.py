"""metrics.json: this run only, validated, written atomically."""

import json

import pytest

from labhelpers import results


def test_save_metrics_replaces_an_earlier_run_and_validates(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("SFTLABS_RESULTS", str(tmp_path))
    results.save_metrics("lab", {"a": 1.5, "stale": 1})
    path = results.save_metrics("lab", {"b": "x", "ok": True, "n": np.float64(0.25)})
    assert json.loads(path.read_text()) == {"b": "x", "ok": True, "n": 0.25}  # nothing left from the first run
    with pytest.raises(ValueError, match="metric 'c'"):
        results.save_metrics("lab", {"c": [1, 2]})
    for bad in (float("nan"), float("inf"), -float("inf"), np.float64("inf")):
        with pytest.raises(ValueError, match="finite"):
            results.save_metrics("lab", {"d": bad})
    assert json.loads(path.read_text()) == {"b": "x", "ok": True, "n": 0.25}  # a rejected call writes nothing
    with pytest.raises(FileNotFoundError, match="save_metrics"):
        results.load_metrics("other")
