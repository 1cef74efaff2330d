"""Check that the shipped base can carry Labs 2 and 3: forgetting appears, LoRA experts merge.

``python tools/calibrate_base.py`` (about 5 minutes on 2 cores) writes ``docs/base-calibration.json``:
base scores; a naive full fine-tune on SQL (does the arithmetic probe drop?); LoRA experts for code and
SQL; and their adapters merged with ``peft``'s ``add_weighted_adapter`` (do both skills survive?).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from labhelpers import profiles
from labhelpers.evaluation import evaluate_task, perplexity
from labhelpers.models import load_model
from labhelpers.paths import REPO_ROOT, data_dir
from labhelpers.peft_methods import peft_config
from labhelpers.tasks import load_split, read_jsonl
from labhelpers.training import train_sft

STEPS = 150


def scores(model, tokenizer, profile) -> dict:
    heldout = [d["text"] for d in read_jsonl(data_dir() / "corpus" / "heldout.jsonl")][:200]
    out = {task: float(evaluate_task(model, tokenizer, task, "test", profile.n_eval, profile.eval_batch_size)
                       ["correct"].mean()) for task in ("code", "sql", "arithmetic")}
    out["heldout_ppl"] = perplexity(model, tokenizer, heldout)
    return out


def main() -> None:
    from peft import PeftModel

    profile = profiles.get("ci").with_(max_steps=STEPS)
    record: dict = {"steps": STEPS}
    start = time.perf_counter()
    model, tokenizer = load_model(profile)
    record["base"] = scores(model, tokenizer, profile)
    full = train_sft(model, tokenizer, load_split("sql", "train"), profile, learning_rate=profile.full_ft_learning_rate)
    record["full_ft_sql"] = scores(full.model, tokenizer, profile)
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("code", "sql"):
            model, tokenizer = load_model(profile)
            run = train_sft(model, tokenizer, load_split(task, "train"), profile, peft_config=peft_config("lora", profile))
            record[f"lora_{task}_expert"] = scores(run.model, tokenizer, profile)
            run.model.save_pretrained(Path(tmp) / task)
        base, tokenizer = load_model(profile)
        merged = PeftModel.from_pretrained(base, Path(tmp) / "code", adapter_name="code")
        merged.load_adapter(Path(tmp) / "sql", adapter_name="sql")
        for kind, weights in (("cat", [1.0, 1.0]), ("linear", [0.5, 0.5])):
            merged.add_weighted_adapter(["code", "sql"], weights, f"merged_{kind}", combination_type=kind)
            merged.set_adapter(f"merged_{kind}")
            record[f"lora_merge_{kind}"] = scores(merged, tokenizer, profile)
    record["seconds"] = time.perf_counter() - start
    out = REPO_ROOT / "docs" / "base-calibration.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
