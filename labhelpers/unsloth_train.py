"""One QLoRA run through Unsloth's ``FastLanguageModel``: load in 4-bit, ``get_peft_model``, TRL's
``SFTTrainer``. Run by the Python of Unsloth's environment (:mod:`labhelpers.unsloth_cli`), never
imported by the course: ``unsloth`` must be imported before transformers, trl and peft (it patches
them), and its pins are not the course's. It imports unsloth, not labhelpers.

Usage: ``python unsloth_train.py SPEC.json RESULT.json``. The spec names the base model's folder, the
tokenized rows (JSONL of ``input_ids`` + ``labels``), the LoRA settings, the ``SFTConfig`` fields and
where to save the adapter; the result holds the loss of every step, the training time, the tokens
trained on, peak CUDA memory (None on a CPU), the quantization Unsloth loaded the base with and the
versions that ran.
"""
import json
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import unsloth  # noqa: F401  first of all: it patches transformers, trl and peft as they import
    from unsloth import FastLanguageModel

    import datasets
    import peft
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    if cuda:  # the peaks cover the whole run: loading the base, the adapter and training
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(spec["seed"])
    model, tokenizer = FastLanguageModel.from_pretrained(
        spec["model"], max_seq_length=spec["max_seq_length"], dtype=getattr(torch, spec["dtype"]),
        load_in_4bit=True, local_files_only=True)
    lora = spec["lora"]
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"], bias="none", random_state=spec["seed"],
        use_gradient_checkpointing="unsloth" if spec["gradient_checkpointing"] else False)

    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f]
    train = datasets.Dataset.from_list(rows)
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append([state.global_step, float(logs["loss"])])

    args = trl.SFTConfig(**spec["sft"], include_num_input_tokens_seen="non_padding")
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=args,
                             callbacks=[Losses()])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(spec["adapter_dir"])
    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    mib = 2 ** 20
    result = {
        "backend": "unsloth", "device": "cuda" if cuda else "cpu", "losses": losses, "train_seconds": seconds,
        "steps": trainer.state.global_step, "train_tokens": int(trainer.state.num_input_tokens_seen),
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / mib if cuda else None,
        "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / mib if cuda else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "quantization": {k: str(v) for k, v in quant.items()},
        "versions": {m.__name__: m.__version__ for m in (unsloth, torch, transformers, trl, peft, datasets)},
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
