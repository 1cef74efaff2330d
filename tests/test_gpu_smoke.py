"""`make bench` and `make gpu-smoke`: their end-to-end runs through make (quick sizes / --dry-run on the
CPU) are in tests/test_make_targets.py. No timing is asserted: the benchmark itself prints the ratios."""

from labhelpers.course import gpu_smoke


def test_gpu_smoke_refuses_to_run_without_cuda_unless_dry(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().out


def test_unit_tests_are_counted_from_their_junit_report(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert False\n\n"
        "@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n")
    result = gpu_smoke.run_unit_tests(tmp_path)
    assert result["returncode"] == 1 and result["seconds"] > 0
    assert (result["tests"], result["failures"], result["errors"], result["skipped"]) == (3, 1, 0, 1)
    assert result["failed"] == ["tests.test_fake::test_bad"]


def test_the_stand_in_profile_is_t4s_rehearsal_on_cuda():
    from labhelpers import profiles

    stand_ins = gpu_smoke.smoke_profile(dry_run=False, stand_ins=True)
    assert stand_ins.device == "cuda" and stand_ins == profiles.get("t4").rehearsal().with_(
        name=stand_ins.name, device="cuda")
    assert gpu_smoke.smoke_profile(dry_run=True, stand_ins=True).name == "smoke"
    full = gpu_smoke.smoke_profile(dry_run=False, stand_ins=True, full_size=True, name="gpu-24gb")
    assert full == profiles.get("gpu-24gb").with_(name=full.name, max_steps=30, search_steps=30, n_eval=32,
                                                       eval_batch_size=32)
