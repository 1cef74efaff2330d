"""`make bench` and `make gpu-smoke`: their end-to-end runs through make (quick sizes / --dry-run on the
CPU) are in tests/test_make_targets.py. No timing is asserted: the benchmark itself prints the ratios."""

from labhelpers.course import gpu_smoke


def test_gpu_smoke_refuses_to_run_without_cuda_unless_dry(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().out
