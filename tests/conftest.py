"""Shared fixtures. Everything runs offline: hub access is switched off for the whole session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from labhelpers import profiles  # noqa: E402


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
