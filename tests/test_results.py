"""metrics.json: merged, validated, written atomically."""

import json

import pytest

from labhelpers import results


def test_save_metrics_merges_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLABS_RESULTS", str(tmp_path))
    results.save_metrics("lab", {"a": 1.5})
    path = results.save_metrics("lab", {"b": "x", "ok": True})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": "x", "ok": True}
    with pytest.raises(ValueError, match="metric 'c'"):
        results.save_metrics("lab", {"c": [1, 2]})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            results.save_metrics("lab", {"d": bad})
    with pytest.raises(FileNotFoundError, match="save_metrics"):
        results.load_metrics("other")
