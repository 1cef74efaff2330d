"""Bad input across the public API: each gets an exception whose message names the problem and the
fix, nothing crashes, and nothing half-written is left behind (table-driven)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from helpers import PICKLE_RAN, malicious_pickle, tiny_checkpoint
from labhelpers import (
    chat,
    continual,
    data,
    memory,
    merging,
    models,
    peft_methods,
    profiles,
    quantization,
    results,
    sandbox,
)
from labhelpers.tasks import get_task

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _truncated(tmp: Path) -> None:
    a, b = tiny_checkpoint(tmp / "a"), tiny_checkpoint(tmp / "b", scale=2.0)
    raw = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(raw[:-20])
    merging.merge_checkpoints([a, b], tmp / "out", "linear")


def _pickle_as_safetensors(tmp: Path) -> None:
    a, b = tiny_checkpoint(tmp / "a"), tiny_checkpoint(tmp / "b")
    (b / "model.safetensors").write_bytes(malicious_pickle())
    merging.merge_checkpoints([a, b], tmp / "out", "linear")


def _pickle_only_model(tmp: Path) -> None:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(malicious_pickle())
    models.load_model(profiles.get("ci"), str(folder))


def _mismatched(tmp: Path) -> None:
    merging.merge_checkpoints([tiny_checkpoint(tmp / "a"), tiny_checkpoint(tmp / "b", shape=(4, 5))], tmp / "out",
                              "linear")


def _long_chat(tokenizer) -> None:
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]}
    data.tokenize_rows([long], tokenizer, max_length=32)


def _no_template(tokenizer) -> None:
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    chat.require_chat_template(bare)


def _checkpoint_without_steps(tmp: Path, tokenizer) -> None:
    from datasets import Dataset

    from labhelpers.training import train_sft

    model = torch.nn.Linear(2, 2)
    train_sft(model, tokenizer, Dataset.from_list([CHAT]), profiles.get("ci"), checkpoint_dir=tmp / "out")


CASES = {
    # datasets
    "row missing fields": (lambda t, tok: data.validate_rows([{"question": "q"}]), "fields \\['question'\\]", "needs 'messages'"),
    "rows of mixed formats": (lambda t, tok: data.validate_rows([CHAT, {"text": "t"}]), "mix the formats", "convert them to one"),
    "mistyped field": (lambda t, tok: data.validate_rows([{"prompt": 3, "completion": "a"}]), "'prompt'", "must be strings"),
    "empty text": (lambda t, tok: data.validate_rows([{"text": ""}]), "'text'", "non-empty string"),
    "empty dataset": (lambda t, tok: data.validate_rows([]), "empty", "at least one training row"),
    "not a dict": (lambda t, tok: data.validate_rows(["just a string"]), "must be a dict", "dict"),
    "unknown chat role": (lambda t, tok: chat.validate_messages([{"role": "robot", "content": "x"}]), "unknown role 'robot'", "valid roles"),
    "no assistant turn": (lambda t, tok: chat.validate_messages([{"role": "user", "content": "x"}]), "no assistant turn", "add the reference answer"),
    "over-long conversation": (lambda t, tok: _long_chat(tok), "more than max_length=32", "raise"),
    "missing chat template": (lambda t, tok: _no_template(tok), "no chat template", "tokenizer.chat_template ="),
    "unknown task": (lambda t, tok: get_task("poetry"), "unknown task 'poetry'", "valid tasks"),
    # configuration
    "unknown profile": (lambda t, tok: profiles.get("gpu-1tb"), "unknown profile 'gpu-1tb'", "valid profiles"),
    "unknown PEFT method": (lambda t, tok: peft_methods.peft_config("magic", profiles.get("ci")), "unknown PEFT method", "valid methods"),
    "unknown memory method": (lambda t, tok: peft_methods.parse_method("lora+turbo"), "unknown method", "'\\+gc'"),
    "LoRA rank 0": (lambda t, tok: peft_methods.peft_config("lora", profiles.get("ci"), r=0), "rank r must be a positive", "positive integer"),
    "negative LoRA alpha": (lambda t, tok: peft_methods.peft_config("lora", profiles.get("ci"), lora_alpha=-4), "lora_alpha", "must be positive"),
    "LoRA dropout 1": (lambda t, tok: peft_methods.peft_config("lora", profiles.get("ci"), lora_dropout=1.0), "lora_dropout", "\\[0, 1\\)"),
    "unknown quantization": (lambda t, tok: models.quantization_config("int3", torch.float32), "unknown quantization 'int3'", "valid: None, nf4, int8"),
    "missing target modules": (lambda t, tok: peft_methods.check_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["q_proj"]), "\\['q_proj'\\] are not in the model", "valid linear layers"),
    # merging
    "TIES density above 1": (lambda t, tok: merging.ties(torch.zeros(3), [torch.ones(3)], 1.5), "density must be in \\(0, 1\\]", "fraction of each task vector kept"),
    "SLERP t outside [0, 1]": (lambda t, tok: merging.slerp(torch.ones(2), torch.zeros(2) + 2, 2.0), "t must be in \\[0, 1\\]", "0 = first model"),
    "merge weights count": (lambda t, tok: merging.linear([torch.ones(2), torch.ones(2)], [1.0]), "1 weights for 2 models", "one weight per model"),
    "mismatched checkpoints": (lambda t, tok: _mismatched(t), "has shape", "shape"),
    "truncated safetensors": (lambda t, tok: _truncated(t), "truncated", "ends before tensor data"),
    "pickle where safetensors expected": (lambda t, tok: _pickle_as_safetensors(t), "is not a safetensors file", "safe_serialization=True"),
    "pickle-only model folder": (lambda t, tok: _pickle_only_model(t), "only as pickles", "safe_serialization=True"),
    # memory and quantization
    "model too large for the device": (lambda t, tok: memory.require_fits("70B", "full", 1, 2048, "cpu", "bfloat16", available=2**30), "will not fit", "Lower the batch size"),
    "negative GPU size": (lambda t, tok: memory.plan("7B", -16), "gpu_memory_gb must be a positive number", "positive"),
    "unknown model size": (lambda t, tok: memory.plan("9B", 16), "unknown model '9B'", "size label"),
    "integer tensor to NF4": (lambda t, tok: quantization.quantize_nf4(torch.arange(8)), "must be float32", "convert it with .float\\(\\)"),
    # the rest of the API
    "replay fraction 1.5": (lambda t, tok: continual.replay_mix([CHAT], [CHAT], 1.5, tok, 64), "replay fraction must be in \\[0, 1\\)", "\\[0, 1\\)"),
    "WiSE-FT alpha 2": (lambda t, tok: continual.interpolate_weights({"w": torch.ones(1)}, {"w": torch.ones(1)}, 2.0), "alpha must be in \\[0, 1\\]", "0 = base"),
    "checkpoints without save_steps": (lambda t, tok: _checkpoint_without_steps(t, tok), "needs save_steps", "how often to save"),
    "NaN metric": (lambda t, tok: results.save_metrics("lab", {"score": float("nan")}), "metric 'score'", "finite numbers"),
    "sandbox limit 0": (lambda t, tok: sandbox.run_python("pass", timeout_s=0), "must be positive", "positive"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named_with_its_fix(case, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SFTLABS_RESULTS", str(tmp_path / "results"))
    call, problem, fix = CASES[case]
    with pytest.raises((ValueError, TypeError, KeyError, FileNotFoundError, MemoryError)) as info:
        call(tmp_path, tokenizer)
    message = str(info.value)
    assert __import__("re").search(problem, message), (case, message)
    assert __import__("re").search(fix, message), (case, message)
    # nothing half-written: no output folder, no partial merge, no metrics file
    assert not (tmp_path / "out").exists(), case
    assert not list(tmp_path.glob(".out.partial-*")), case
    assert not (tmp_path / "results" / "lab" / "metrics.json").exists(), case
    assert not PICKLE_RAN.exists(), "a pickle was unpickled"


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25
