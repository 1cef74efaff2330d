"""The shipped base model: reloads offline, manifest honest, a real language model; loaders' errors."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from labhelpers import models
from labhelpers.evaluation import evaluate_task, perplexity
from labhelpers.models import MODEL_SIZES
from labhelpers.paths import base_model_dir
from labhelpers.tasks import read_jsonl
from labhelpers.paths import data_dir


SHIPPED_SIZES = tuple(MODEL_SIZES)  # every size is shipped (Lab 2b searches on all of them)


@pytest.mark.parametrize("size", SHIPPED_SIZES)
def test_reloads_offline_in_a_fresh_process(size):
    code = ("from labhelpers import profiles, models\n"
            f"m, t = models.load_model(profiles.get('ci'), name={size!r})\n"
            "print(type(m).__name__, t.chat_template is not None)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LlamaForCausalLM True" in out.stdout


@pytest.mark.parametrize("size", SHIPPED_SIZES)
def test_manifest_hashes_match_files(size):
    folder = base_model_dir(size)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"], "manifest lists no files"
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert manifest["model_size"] == size
    assert manifest["heldout_perplexity"] < manifest["uniform_perplexity"] / 20
    assert manifest["arithmetic_test_accuracy"] >= 0.9


def test_is_a_real_language_model(base):
    model, tokenizer = base
    manifest = json.loads((base_model_dir("tiny") / "manifest.json").read_text())
    heldout = [d["text"] for d in read_jsonl(data_dir() / "corpus" / "heldout.jsonl")][:200]
    ppl = perplexity(model, tokenizer, heldout)
    assert ppl < manifest["uniform_perplexity"] / 20
    assert ppl == pytest.approx(perplexity(model, tokenizer, heldout))  # deterministic


def test_base_has_the_general_skill_but_not_the_tasks(base):
    model, tokenizer = base
    assert evaluate_task(model, tokenizer, "arithmetic", "test")["correct"].mean() >= 0.9


def test_nf4_loading_with_double_quantization(ci_profile):
    import bitsandbytes as bnb

    model, _ = models.load_model(ci_profile, quantization="nf4")
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and linear4[0].weight.quant_state.nested  # double quantization on
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_4bit_models_keep_the_plain_layout_on_a_cpu_with_avx512_bf16(ci_profile, rehearsal_hub, monkeypatch):
    """bitsandbytes repacks 4-bit weights for its CPU kernel at the first inference on such a CPU; the
    repacked weights then train wrong, and layers whose output features are not a multiple of 32 (the
    rehearsal models' hidden size 16) fail outright. Loaded by the course, no layer repacks."""
    import bitsandbytes.nn.modules as bnb_modules

    from labhelpers.course import rehearsal

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on such a CPU, whatever this one is
    for name in (None, str(rehearsal.snapshot_dir("Qwen/Qwen2.5-Coder-0.5B-Instruct", rehearsal_hub))):
        model, _ = models.load_model(ci_profile, name, quantization="nf4")
        flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert flags and not any(flags)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
        assert all(not getattr(p.quant_state, "packing_format_for_cpu", False)
                   for p in model.parameters() if getattr(p, "quant_state", None) is not None)


def test_loader_errors(ci_profile, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown quantization 'nf3'"):
        models.quantization_config("nf3", torch.float32)
    monkeypatch.setenv("SFTLABS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make base-model"):
        models.model_source("tiny")


def test_count_parameters(base):
    counts = models.count_parameters(base[0])
    assert counts["total"] == sum(p.numel() for p in base[0].parameters())


def test_unwrap_peft_returns_the_transformers_model(base):
    from peft import LoraConfig, get_peft_model

    model, _ = base
    assert models.unwrap_peft(model) is model
    import copy

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    inner = models.unwrap_peft(wrapped)
    assert type(inner).__name__ == type(model).__name__ and inner is wrapped.base_model.model


def test_local_checkpoint_is_the_shipped_folder_or_the_hub_snapshot(rehearsal_hub):
    """What Axolotl, Unsloth and the merges read: the shipped folder, or the hub model's snapshot
    (downloaded on first use where a hub is reachable; found in the cache offline, as here)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from labhelpers.course import rehearsal

    assert models.local_checkpoint("tiny") == base_model_dir("tiny")
    hub_id = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    folder = models.local_checkpoint(hub_id)
    assert folder == rehearsal.snapshot_dir(hub_id, rehearsal_hub) and (folder / "config.json").exists()
    with pytest.raises(LocalEntryNotFoundError, match="HF_HUB_OFFLINE"):  # offline, and not in the cache
        models.local_checkpoint("Qwen/No-Such-Model")
