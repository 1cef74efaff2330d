"""`make bench` and `make gpu-smoke` run end to end (tiny sizes / --dry-run on the CPU) and write their
reports. No timing is asserted here: the benchmark itself prints the measured ratios."""

import json

import pytest

from labhelpers import bench, gpu_smoke


@pytest.mark.slow
def test_bench_quick_writes_every_section(tmp_path):
    assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results["training"]["contenders"]) == {"labhelpers", "labhelpers_random_batches", "labhelpers_padding_free",
                                                      "trl_default", "plain_pytorch"}
    assert all(v["tokens_per_s"] > 0 for v in results["training"]["contenders"].values())
    assert len(results["merging"]) == 2 and all(r["streaming_peak_rss_mib"] >= 0 for r in results["merging"])
    assert {r["method"] for r in results["memory"]} == {"full", "lora", "qlora", "qlora+gc+8bit"}
    text = (tmp_path / "bench.md").read_text()
    for heading in ("SFT throughput", "Merging", "NF4 quantization", "Memory"):
        assert heading in text


def test_bench_runs_notebooks_when_asked(tmp_path):
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    assert bench.main(["--only", "notebooks", "--run-notebooks", "smoke", "--notebook-source", str(fixtures),
                       "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["notebooks"]
    assert [(r["lab"], r["profile"]) for r in rows] == [("demo_lab", "smoke")] and rows[0]["seconds"] > 0
    assert "## Notebooks" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_gpu_smoke_dry_run_covers_every_lab(tmp_path):
    out = tmp_path / "gpu-smoke.json"
    assert gpu_smoke.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["profile"] == "smoke" and set(report["labs"]) == {"lab1_peft", "lab2_domain", "lab3_merging", "lab4_memory"}
    assert set(report["labs"]["lab4_memory"]) >= {"full", "lora", "qlora+gc", "seconds"}
    assert 0 <= report["labs"]["lab3_merging"]["merged"]["code"] <= 1


def test_gpu_smoke_refuses_to_run_without_cuda_unless_dry(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().out
