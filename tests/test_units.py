"""labhelpers.units: one definition of MiB and GiB, and file sizes on disk."""

from labhelpers.units import GiB, MiB, files_mib, to_mib


def test_binary_units():
    assert MiB == 1024 * 1024 and GiB == 1024 * MiB
    assert to_mib(3 * MiB) == 3.0 and to_mib(512 * 1024) == 0.5


def test_files_mib_counts_files_and_skips_folders(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * MiB)
    (tmp_path / "b.bin").write_bytes(b"\0" * (MiB // 2))
    (tmp_path / "sub").mkdir()
    assert files_mib(tmp_path.iterdir()) == 1.5
    assert files_mib([]) == 0.0
