"""Pretrain the shipped tiny base model: ``python -m labhelpers.course.pretrain --size tiny``.

Steps: generate the corpus (``labhelpers.tasks.corpus``), train a byte-level BPE tokenizer with
``tokenizers`` (digits split one by one, the chat template of ``labhelpers.chat``), build a
``LlamaForCausalLM`` of the requested size, train it on packed token blocks with AdamW and a cosine
schedule, and save it with safetensors plus ``manifest.json`` (config, seed, corpus recipe, sha256 of
each file, held-out perplexity against the uniform baseline, the arithmetic probe score).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from labhelpers import chat
from labhelpers.tasks import corpus
from labhelpers.evaluation import evaluate_task, perplexity, token_blocks
from labhelpers.models import MODEL_SIZES, sha256_of
from labhelpers.paths import base_model_dir, data_dir
from labhelpers.tasks import PRETRAINING_TASKS, read_jsonl

VOCAB_SIZE = 1024
DEFAULT_STEPS = {"micro": 2400, "tiny": 2400, "small": 1000}  # what the shipped bases were trained with


@dataclass(frozen=True)
class PretrainConfig:
    size: str = "tiny"
    seed: int = 0
    steps: int = 2400
    seq_len: int = 256
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer with single-digit tokens, our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(chat.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token=chat.END_OF_TURN,
                                   pad_token="<|pad|>", padding_side="left")
    fast.chat_template = chat.CHAT_TEMPLATE
    return fast


def model_config(size: str, tokenizer):
    """The ``LlamaConfig`` of a named size; unknown sizes list the valid ones."""
    if size not in MODEL_SIZES:
        raise KeyError(f"unknown model size {size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **MODEL_SIZES[size])


def pretrain(cfg: PretrainConfig, out_dir: Path | None = None) -> dict:
    """Train the tokenizer and model, save both with a manifest, return the manifest."""
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir or base_model_dir(cfg.size))
    corpus_dir = data_dir() / "corpus"
    train_docs, heldout_docs = read_jsonl(corpus_dir / "train.jsonl"), read_jsonl(corpus_dir / "heldout.jsonl")
    task_texts = [t["content"] for task in PRETRAINING_TASKS for row in read_jsonl(data_dir() / task / "train.jsonl")
                  for t in row.get("messages", [])]
    tokenizer = train_tokenizer([d["text"] for d in train_docs] + task_texts)
    model = LlamaForCausalLM(model_config(cfg.size, tokenizer))
    blocks = token_blocks([d["text"] for d in train_docs], tokenizer, cfg.seq_len)
    heldout = [d["text"] for d in heldout_docs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, losses = time.perf_counter(), []
    model.train()
    for step in (bar := tqdm(range(cfg.steps), desc=f"pretrain {cfg.size}")):
        batch = blocks[torch.randint(len(blocks), (cfg.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log = {"losses": losses, "train_seconds": train_seconds, "n_train_tokens": blocks.numel()}
    (out_dir / "pretrain_log.json").write_text(json.dumps(log))
    return write_manifest(out_dir, cfg, model, tokenizer, heldout, **log)


def write_manifest(out_dir: Path, cfg: PretrainConfig, model, tokenizer, heldout: list[str],
                   losses: list[float], train_seconds: float, n_train_tokens: int) -> dict:
    """Evaluate the saved model and write ``manifest.json`` next to it."""
    probe = evaluate_task(model, tokenizer, "arithmetic", "test")
    manifest = {
        "model_size": cfg.size,
        "pretrain_config": asdict(cfg),
        "model_config": {k: v for k, v in model.config.to_dict().items() if k in
                         ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                          "vocab_size", "max_position_embeddings", "tie_word_embeddings")},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "corpus_recipe": {"generator": "labhelpers.tasks.corpus.documents", "seed": cfg.seed,
                          "n_documents": corpus.N_DOCUMENTS, "mix": corpus.MIX,
                          "n_train_tokens": n_train_tokens, "epochs": cfg.steps * cfg.batch_size * cfg.seq_len
                          / n_train_tokens},
        "heldout_perplexity": perplexity(model, tokenizer, heldout, cfg.seq_len),
        "uniform_perplexity": float(len(tokenizer)),
        "arithmetic_test_accuracy": float(probe["correct"].mean()),
        "final_train_loss": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(train_seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "sha256": {p.name: sha256_of(p)
                   for p in sorted(out_dir.iterdir()) if p.name != "manifest.json"},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def remanifest(cfg: PretrainConfig, out_dir: Path | None = None) -> dict:
    """Rewrite ``manifest.json`` of a saved model from its ``pretrain_log.json``."""
    out_dir = Path(out_dir or base_model_dir(cfg.size))
    model, tokenizer = LlamaForCausalLM.from_pretrained(out_dir), AutoTokenizer.from_pretrained(out_dir)
    heldout = [d["text"] for d in read_jsonl(data_dir() / "corpus" / "heldout.jsonl")]
    log = json.loads((out_dir / "pretrain_log.json").read_text())
    return write_manifest(out_dir, cfg, model.eval(), tokenizer, heldout, **log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES))
    parser.add_argument("--steps", type=int, default=None, help="default: the shipped base's, per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--manifest-only", action="store_true",
                        help="re-evaluate an already pretrained model and rewrite its manifest")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(size=args.size, steps=args.steps or DEFAULT_STEPS[args.size], seed=args.seed)
    manifest = remanifest(cfg, args.out) if args.manifest_only else pretrain(cfg, args.out)
    print(json.dumps({k: manifest[k] for k in ("n_parameters", "heldout_perplexity", "uniform_perplexity",
                                                "arithmetic_test_accuracy", "train_seconds")}, indent=2))


if __name__ == "__main__":
    main()
