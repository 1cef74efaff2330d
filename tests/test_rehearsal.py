"""The hub-shaped rehearsal models: built offline, resolved by hub id, shaped like the hub's, and
their chat templates masked on exactly the assistant's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from labhelpers import profiles
from labhelpers.chat import TEMPLATE_FAMILIES, has_generation_markers
from labhelpers.course import rehearsal
from labhelpers.data import IGNORE_INDEX, assistant_masks, tokenize_chat
from labhelpers.paths import REPO_ROOT

CONVERSATION = [
    {"role": "system", "content": "Answer with one SQLite query."},
    {"role": "user", "content": "How many employees?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM employees;"},
    {"role": "user", "content": "Only in Rome?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM employees WHERE city = 'Rome';"},
]
ANSWERS = [t["content"] for t in CONVERSATION if t["role"] == "assistant"]


def _tokenizer(hub_id, rehearsal_hub):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(rehearsal.snapshot_dir(hub_id, rehearsal_hub))


def test_every_gpu_profile_model_has_a_stand_in():
    named = {m for name in ("t4", "gpu-24gb") for p in [profiles.get(name)]
             for m in (p.base_model, p.large_model, *p.sweep_models)}
    assert named <= set(rehearsal.MODELS)
    assert {spec.template for spec in rehearsal.MODELS.values()} == set(TEMPLATE_FAMILIES)


@pytest.mark.parametrize("hub_id", sorted(rehearsal.MODELS))
def test_stand_in_has_the_hub_models_shape(hub_id, rehearsal_hub):
    spec = rehearsal.MODELS[hub_id]
    folder = rehearsal.snapshot_dir(hub_id, rehearsal_hub)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == spec.model_type and config["vocab_size"] == spec.vocab_size
    assert config["tie_word_embeddings"] is spec.tie_word_embeddings
    assert not any(folder.glob("*.bin")) and any(folder.glob("*.safetensors"))
    tokenizer = _tokenizer(hub_id, rehearsal_hub)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (spec.bos, spec.eos)
    assert not has_generation_markers(tokenizer)  # as on the hub: the mask must be found another way
    assert tokenizer.convert_tokens_to_ids(spec.eos) == config["eos_token_id"]
    if spec.bos:  # Llama tokenizers prepend BOS to plain text, Qwen's do not
        assert tokenizer("SELECT 1")["input_ids"][0] == tokenizer.bos_token_id


# What the mask must cover, per family: each answer and its end-of-turn token, nothing else.
EXPECTED_MASKED = {
    "chatml": "".join(f"{a}<|im_end|>" for a in ANSWERS),
    "llama3": "".join(f"{a}<|eot_id|>" for a in ANSWERS),
    "inst": "".join(f" {a} </s>" for a in ANSWERS),
}


@pytest.mark.parametrize("hub_id", sorted(rehearsal.MODELS))
def test_assistant_mask_covers_exactly_the_assistant_tokens(hub_id, rehearsal_hub):
    tokenizer = _tokenizer(hub_id, rehearsal_hub)
    labels = tokenize_chat(CONVERSATION, tokenizer, None)["labels"]
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == EXPECTED_MASKED[rehearsal.MODELS[hub_id].template]
    assert trained[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert sum(t == tokenizer.eos_token_id for t in trained) == len(ANSWERS)
    if rehearsal.MODELS[hub_id].template != "inst":  # the count: the answers' tokens and one end-of-turn each
        assert len(trained) == sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in ANSWERS)


def test_prefix_masks_equal_the_generation_markers_on_the_course_template(tokenizer):
    from labhelpers.tasks import task_rows

    conversations = [CONVERSATION] + [r["messages"] for task in ("sql", "code") for r in task_rows(task, "test", 5)]
    by_markers = assistant_masks(conversations, tokenizer)
    by_prefixes = assistant_masks(conversations, tokenizer, use_markers=False)
    assert by_markers == by_prefixes and all(any(mask) for _, mask in by_markers)


def test_load_model_resolves_the_hub_id_offline(rehearsal_hub):
    """The unchanged load_model(profile), in a fresh process, with only the environment set."""
    code = ("from labhelpers import profiles; from labhelpers.models import load_model; "
            "m, t = load_model(profiles.get('t4-rehearsal')); "
            "print(type(m).__name__, m.config.vocab_size, m.dtype, t.eos_token)")
    env = {**os.environ, **rehearsal.environment(rehearsal_hub)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["Qwen2ForCausalLM", "151936", "torch.float16", "<|im_end|>"]


def test_build_is_skipped_when_current_and_redone_when_forced(tmp_path):
    cache = rehearsal.build(tmp_path)
    stamp = (cache / "rehearsal.json").stat().st_mtime_ns
    assert rehearsal.build(tmp_path) == cache and (cache / "rehearsal.json").stat().st_mtime_ns == stamp
    refs = cache / "models--Qwen--Qwen2.5-Coder-0.5B-Instruct" / "refs" / "main"
    assert refs.read_text() == rehearsal.REVISION


@pytest.mark.parametrize("hub_id", sorted(rehearsal.MODELS))
def test_full_size_stand_ins_have_the_hub_models_parameter_count(hub_id):
    """A GPU smoke run's stand-in at full size is the hub model's shape (only its weights are random)."""
    from transformers import AutoModelForCausalLM

    from labhelpers.memory.architectures import architecture

    spec = rehearsal.MODELS[hub_id]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(rehearsal.stand_in_config(spec, full_size=True))
    assert sum(p.numel() for p in model.parameters()) == architecture(spec.architecture).params


def test_full_size_build_names_unknown_hub_ids(tmp_path):
    with pytest.raises(ValueError, match="no rehearsal model for \\['org/none'\\]; known hub ids: Qwen/"):
        rehearsal.build(tmp_path, full_size=("org/none",))
