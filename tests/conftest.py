"""Shared fixtures. Everything runs offline: hub access is switched off for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# hub ids resolve to the hub-shaped rehearsal models (labhelpers.course.rehearsal, built by the
# `rehearsal_hub` fixture); set before huggingface_hub is imported, which reads it once
_REHEARSAL_HUB = str(Path(__file__).resolve().parent.parent / "build" / "rehearsal-hub")
os.environ.setdefault("SFTLABS_REHEARSAL_HUB", _REHEARSAL_HUB)
os.environ.setdefault("HF_HUB_CACHE", os.environ["SFTLABS_REHEARSAL_HUB"])
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from labhelpers import profiles  # noqa: E402


@pytest.fixture(scope="session")
def rehearsal_hub():
    """The hub cache holding the rehearsal models (built once; a few seconds)."""
    from labhelpers.course import rehearsal

    return rehearsal.build()


@pytest.fixture(scope="session")
def ci_profile():
    return profiles.get("ci")


@pytest.fixture(scope="session")
def base(ci_profile):
    """(model, tokenizer) of the shipped tiny base; tests must not train it in place."""
    from labhelpers.models import load_model

    return load_model(ci_profile)


@pytest.fixture(scope="session")
def tokenizer(base):
    return base[1]


def pytest_terminal_summary(terminalreporter):
    """A line naming the processor in pytest's closing summary: how long the notebooks take depends on it (README)."""
    from labhelpers.course.runner import processor

    terminalreporter.write_line(f"processor: {processor()}")
