"""Where the memory of training goes: measure it on the real model, estimate it from a config, plan.

Four parts make up the memory of one training step (Lab 4):

* **weights**: every parameter and buffer (for 4-bit weights: the packed codes and their
  quantization constants);
* **gradients**: one per trainable parameter, in its dtype;
* **optimizer states**: AdamW keeps two fp32 moments per trainable parameter (8 bytes), 8-bit AdamW
  two uint8 codes plus one fp32 scale per 256 values;
* **activations**: what autograd saves in the forward pass for the backward pass; they grow with
  batch size x sequence length, and gradient checkpointing trades them for recomputation.

:func:`measure_training_step` measures all four on a model (tensor byte counts, activations through
``torch.autograd.graph.saved_tensors_hooks``, the peak of live tensors through a dispatch mode, and on
CUDA ``torch.cuda.max_memory_allocated``). :func:`estimate_training_step` predicts them from an
:class:`Architecture` (a ``config.json``) without building the model; :func:`plan` tells which method
fits which GPU, and :func:`zero_per_gpu` applies the ZeRO / FSDP sharding formulas.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from labhelpers.paths import data_dir
from labhelpers.units import GiB, MiB, to_mib

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BASE_METHODS = ("full", "lora", "qlora")
METHOD_OPTIONS = ("gc", "8bit")  # gradient checkpointing, 8-bit AdamW: "qlora+gc+8bit"
NF4_BLOCKSIZE, NESTED_BLOCKSIZE, ADAM8_BLOCKSIZE, ADAM8_MIN_SIZE = 64, 256, 256, 4096
SIZE_LABELS = {"1B": "llama-3.2-1b", "3B": "llama-3.2-3b", "7B": "llama-2-7b", "13B": "llama-2-13b",
               "70B": "llama-3.1-70b"}


# --------------------------------------------------------------------------------------------------
# Peak memory of a block of work (RSS on CPU, the caching allocator on CUDA)
# --------------------------------------------------------------------------------------------------
@dataclass
class PeakMemory:
    """Filled in when the ``measure_peak_memory`` block exits.

    ``peak_mib``: on CUDA ``torch.cuda.max_memory_allocated`` during the block; on CPU the highest
    resident set size sampled every ``interval_s``, minus the resident size when the block began
    (so it counts what the block added, not the interpreter and libraries already loaded).
    """

    device: str
    peak_mib: float = 0.0


@contextmanager
def measure_peak_memory(device: str = "cpu", interval_s: float = 0.005):
    """Context manager yielding a :class:`PeakMemory` for the work inside the block."""
    import psutil
    import torch

    result = PeakMemory(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.peak_mib = to_mib(torch.cuda.max_memory_allocated() - start)
        return
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        result.peak_mib = to_mib(peak[0] - baseline)


# --------------------------------------------------------------------------------------------------
# Byte counts of tensors: every storage counted once
# --------------------------------------------------------------------------------------------------
def _storage_key(tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors``, each underlying storage counted once (views and ties share)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _quant_state_tensors(quant_state) -> list:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code book, nested state, offset)."""
    out = [quant_state.absmax, quant_state.code]
    if getattr(quant_state, "offset", None) is not None:
        out.append(quant_state.offset)
    if getattr(quant_state, "state2", None) is not None:
        out += _quant_state_tensors(quant_state.state2)
    return out


def weight_tensors(model) -> list:
    """Parameters, buffers and 4-bit quantization constants of ``model``."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        if getattr(p, "quant_state", None) is not None:
            tensors += _quant_state_tensors(p.quant_state)
    return tensors


def weight_bytes(model) -> int:
    """Bytes of the model's weights, including the constants that 4-bit weights need to dequantize."""
    return tensor_bytes(weight_tensors(model))


def gradient_bytes(model) -> int:
    """Bytes of the gradients currently held by the model's parameters."""
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, 8-bit codes, their scales and maps)."""
    import torch

    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


@dataclass
class SavedActivations:
    """Filled in when the ``saved_activations`` block exits: what autograd kept for backward."""

    bytes: int = 0
    tensors: int = 0


@contextmanager
def saved_activations(model):
    """Count the tensors autograd saves for backward inside the block, parameters excluded.

    Every storage is counted once (many ops save the same tensor). This is the activation memory
    that lives from the forward pass until the backward pass frees it.
    """
    import torch

    params = {_storage_key(t) for t in weight_tensors(model)}
    seen: dict[tuple[str, int], int] = {}
    record = SavedActivations()

    def pack(t):
        if t.device.type != "meta":
            key = _storage_key(t)
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield record
    record.bytes, record.tensors = sum(seen.values()), len(seen)


def _live_tensor_mode():
    """A ``TorchDispatchMode`` that follows every storage created inside it until it is freed."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only
    import torch

    class LiveTensors(TorchDispatchMode):
        def __init__(self, ignore: set):
            super().__init__()
            self.ignore, self.live, self.current, self.peak = ignore, {}, 0, 0
            self.lock = threading.Lock()

        def _free(self, key) -> None:
            with self.lock:
                self.current -= self.live.pop(key, 0)

        def _track(self, t) -> None:
            if t.device.type == "meta":
                return
            storage = t.untyped_storage()
            key = _storage_key(t)
            if key in self.ignore or key in self.live or storage.nbytes() == 0:
                return
            with self.lock:
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tree_map_only(torch.Tensor, self._track, out)
            return out

    return LiveTensors


@dataclass
class StepMemory:
    """Bytes of one training step, by part. ``peak`` is the most memory held at once (0 if unknown)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int = 0
    source: str = "measured"
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer states + activations (all held at once at the end of forward
        in the second step onwards, when gradients of the previous step are kept until zero_grad)."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def mib(self) -> dict[str, float]:
        """The parts in MiB, for a table."""
        parts = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                 "activations": self.activations, "total": self.total}
        if self.peak:
            parts["peak"] = self.peak
        return {f"{k} (MiB)": v / MiB for k, v in parts.items()}


def make_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, device: str = "cpu") -> dict:
    """A batch of random token ids (labels = inputs), for measuring memory at an exact size."""
    import torch

    _check_positive(batch_size=batch_size, seq_len=seq_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def measure_training_step(model, batch: dict, optimizer=None, steps: int = 2, accumulation_steps: int = 1,
                          autocast_dtype: str | None = None) -> StepMemory:
    """Run ``steps`` optimizer steps on ``batch`` and measure the last one, part by part.

    Weights, gradients and optimizer states are byte counts of the real tensors (the optimizer's
    state exists from the first step on, which is why the last of ``steps >= 2`` is measured).
    Activations are what autograd saved during one forward pass (of one micro-batch).
    ``peak`` is the most bytes held at once: on CUDA ``torch.cuda.max_memory_allocated``; elsewhere
    the weights and optimizer states plus the peak of the tensors created during the step (forward,
    backward and optimizer step), followed by a dispatch mode.

    ``accumulation_steps``: forward/backward passes per optimizer step (gradient accumulation: the
    batch is each micro-batch, gradients add up, the step sees ``accumulation_steps`` x the batch).
    ``autocast_dtype``: ``"bfloat16"``/``"float16"`` runs forward and backward under ``torch.autocast``
    (mixed precision: matmuls in 16 bits, weights and optimizer in fp32).
    ``details`` holds ``seconds`` (of the measured optimizer step) and the loss.
    """
    import torch

    if steps < 1 or accumulation_steps < 1:
        raise ValueError(f"steps and accumulation_steps must be >= 1, got {steps} and {accumulation_steps}")
    if autocast_dtype is not None and autocast_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown autocast dtype {autocast_dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    device = next(model.parameters()).device

    def autocast():
        return torch.autocast(device.type, dtype=getattr(torch, autocast_dtype)) if autocast_dtype else _null()

    result = None
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        last = step == steps - 1
        mode = _null()
        if last:  # what already exists (weights, optimizer states) is not counted again by the tracker
            static = {_storage_key(t) for t in weight_tensors(model)}
            static |= {_storage_key(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
            static_bytes = weight_bytes(model) + optimizer_state_bytes(optimizer)
            mode = _live_tensor_mode()(static)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with mode:
            for _ in range(accumulation_steps):
                with saved_activations(model) as saved, autocast():
                    loss = model(**batch).loss / accumulation_steps
                loss.backward()
            grads = gradient_bytes(model)
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if last:
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else static_bytes + mode.peak
            result = StepMemory(weights=weight_bytes(model), gradients=grads,
                                optimizer=optimizer_state_bytes(optimizer), activations=saved.bytes, peak=peak,
                                details={"seconds": seconds, "loss": float(loss.detach()) * accumulation_steps})
    optimizer.zero_grad(set_to_none=True)
    return result


@contextmanager
def _null():
    yield


def setup_training(method: "str | Method", profile, lora_r: int | None = None, learning_rate: float = 1e-4):
    """(model, optimizer) ready to train with ``method`` on the profile's base model.

    ``full`` trains every weight; ``lora`` adds LoRA (the profile's targets, rank ``lora_r`` or the
    profile's) to the frozen base; ``qlora`` loads the base in NF4 with double quantization first.
    ``+gc`` turns on gradient checkpointing, ``+8bit`` uses bitsandbytes' 8-bit AdamW.
    """
    from peft import get_peft_model

    from labhelpers.peft_methods import prepare

    m = parse_method(method)
    setup = prepare(m.base, profile.with_(gradient_checkpointing=m.gradient_checkpointing),
                    **({"r": lora_r} if lora_r and m.base != "full" else {}))
    model = setup["model"]
    if setup["peft_config"] is not None:
        model = get_peft_model(model, setup["peft_config"])
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if m.base != "full":
            model.enable_input_require_grads()  # as prepare_model_for_kbit_training does for QLoRA
    optimizer = make_optimizer("adamw_bnb_8bit" if m.adam_8bit else "adamw_torch",
                               (p for p in model.parameters() if p.requires_grad), lr=learning_rate)
    return model, optimizer


# --------------------------------------------------------------------------------------------------
# Architectures: read from config.json files (shipped ones need no weights)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer (Llama, Mistral, Qwen2 families), from its config.

    Parameter counts are exact: the model is built on the ``meta`` device (no memory) and counted.
    """

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    linear_params: int  # inside decoder layers (what LoRA targets and NF4 quantizes)
    linear_shapes: tuple[tuple[str, int, int, int], ...]  # (kind, in, out, count)

    @property
    def billions(self) -> float:
        return self.params / 1e9


def architecture(source) -> Architecture:
    """See :func:`_architecture`; shipped names, labels and paths are cached."""
    if isinstance(source, Architecture):
        return source
    if isinstance(source, (str, Path)):
        return _cached_architecture(str(source))
    return _architecture(source)


@functools.lru_cache(maxsize=64)
def _cached_architecture(source: str) -> Architecture:
    return _architecture(source)


def _architecture(source) -> Architecture:
    """An :class:`Architecture` from a shipped name (``list_architectures()``), a size label
    (``"7B"``), a path to a ``config.json`` (or its folder), a ``transformers`` config, or a model."""
    from transformers import AutoConfig, PretrainedConfig

    if hasattr(source, "config") and hasattr(source, "parameters"):
        source = source.config
    if isinstance(source, PretrainedConfig):
        return _config_architecture(source.to_json_string(use_diff=False),
                                    getattr(source, "_name_or_path", "") or source.model_type)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"architecture: expected a name, size label, config path or config, got {type(source).__name__}")
    key = str(source)
    name = SIZE_LABELS.get(key.upper(), key)
    shipped = architectures_dir() / f"{name}.json"
    path = shipped if shipped.exists() else Path(key)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"unknown model {source!r}: use a size label ({', '.join(SIZE_LABELS)}), a shipped "
                         f"architecture ({', '.join(list_architectures())}) or a path to a config.json")
    config = AutoConfig.for_model(**json.loads(path.read_text()))
    return _from_config(config, path.stem if path.name != "config.json" else path.parent.name)


def architectures_dir() -> Path:
    """Shipped ``config.json`` files of real models (no weights): ``data/architectures/<name>.json``."""
    return data_dir() / "architectures"


@functools.lru_cache(maxsize=16)
def _config_architecture(config_json: str, name: str) -> Architecture:
    from transformers import AutoConfig

    fields = json.loads(config_json)
    fields.pop("quantization_config", None)  # the shape is what matters, not how it is stored
    return _from_config(AutoConfig.for_model(**fields), Path(name).name or name)


def list_architectures() -> list[str]:
    """Names of the shipped architecture configs (``data/architectures/*.json``)."""
    return sorted(p.stem for p in architectures_dir().glob("*.json"))


def _from_config(config, name: str) -> Architecture:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    shapes: dict[tuple[str, int, int], int] = {}
    layers = getattr(model, "model", model).layers
    for module_name, module in layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = (module_name.split(".")[-1], module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    linear = sum(i * o * n for (_, i, o), n in shapes.items())
    heads = config.num_attention_heads
    return Architecture(
        name=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
        layers=config.num_hidden_layers, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)), params=params, linear_params=linear,
        linear_shapes=tuple((k, i, o, n) for (k, i, o), n in sorted(shapes.items())))


# --------------------------------------------------------------------------------------------------
# The analytical estimate
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A training method: ``base`` (full, lora, qlora), gradient checkpointing, 8-bit AdamW."""

    base: str
    gradient_checkpointing: bool = False
    adam_8bit: bool = False

    @property
    def label(self) -> str:
        return self.base + ("+gc" if self.gradient_checkpointing else "") + ("+8bit" if self.adam_8bit else "")


def parse_method(method: "str | Method") -> Method:
    """``"qlora+gc+8bit"`` -> ``Method("qlora", True, True)``; unknown parts raise ValueError."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a string like 'lora' or 'qlora+gc+8bit', got {method!r}")
    base, *options = method.lower().split("+")
    if base not in BASE_METHODS or any(o not in METHOD_OPTIONS for o in options):
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(BASE_METHODS)}, optionally with "
                         f"'+gc' (gradient checkpointing) and/or '+8bit' (8-bit AdamW), e.g. 'qlora+gc+8bit'")
    return Method(base, "gc" in options, "8bit" in options)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 weight with double quantization, as bitsandbytes stores it: packed codes
    (2 per byte), one uint8 absmax per 64 values, one fp32 scale per 256 absmax, the fp32 offset,
    and the 256-entry nested and 16-entry NF4 code books (fp32) each weight carries."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + 4 * 256 + 4 * 16


def adam_state_bytes(numels: list[int], adam_8bit: bool) -> int:
    """AdamW states for parameters of ``numels``: 2 fp32 moments and a step counter each; bitsandbytes'
    8-bit AdamW keeps tensors of at least 4096 values as uint8 codes + one fp32 scale per 256."""
    total = 0
    for n in numels:
        if adam_8bit and n >= ADAM8_MIN_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / ADAM8_BLOCKSIZE)
        else:
            total += 8 * n + (0 if adam_8bit else 4)
    if adam_8bit:
        total += 2 * 4 * 256  # the two shared quantization maps
    return total


def estimate_training_step(arch: "Architecture | str", method: "str | Method", batch_size: int, seq_len: int,
                           dtype: str = "float32", lora_r: int = 16,
                           lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"),
                           lora_dropout: float = 0.0) -> StepMemory:
    """Predict the bytes of one training step from the architecture alone.

    Weights: parameters in ``dtype`` (QLoRA: decoder linears in NF4 with double quantization, the
    rest in fp32 as ``prepare_model_for_kbit_training`` leaves them). Gradients and AdamW states:
    for the trainable parameters (all, or the LoRA matrices ``r x in`` and ``out x r`` per target).

    Activations, with ``T = batch_size x seq_len`` tokens, per decoder layer (elements):

    * two RMSNorms: input and normalized output (the output once more when its weight trains): ``4Th``
      (``6Th`` for full fine-tuning), plus ``2T`` reciprocal RMS values;
    * attention: queries and output with ``n_heads``, keys and values with ``n_kv_heads`` heads
      (``2T(n + n_kv) d``), the log-sum-exp of the softmax (``T n``);
    * MLP: gate, SiLU(gate), up and their product: ``4 T i``;
    * LoRA: the ``r``-dimensional output of each target's ``A`` (``T r`` per target), and with dropout
      its mask and the dropped input (``T · in`` each).

    plus the log-softmax of the logits (``T V``, fp32), the final norm (``3Th + T``, full only), the
    labels (and input ids when the embedding trains) as int64, and RoPE's cos/sin (``2 s d``).
    With gradient checkpointing only each layer's input is kept (``L T h``) and one layer's
    activations are recomputed at a time during backward.

    ``peak`` adds what is alive but not saved: the logits the forward pass returns and their
    gradient at the start of backward (``2 T V`` fp32); with checkpointing, the larger of that and
    the backward pass through the layers (one recomputed layer, the gradients, the hidden state's
    gradient).
    """
    arch = arch if isinstance(arch, Architecture) else architecture(arch)
    m = parse_method(method)
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if m.base != "full":
        _check_positive(lora_r=lora_r)
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    a = DTYPE_BYTES[dtype]
    targets = [(k, i, o, n) for k, i, o, n in arch.linear_shapes if k in lora_targets] if m.base != "full" else []
    if m.base != "full" and not targets:
        raise ValueError(f"no LoRA target among {lora_targets} in {arch.name}; linears: "
                         f"{sorted({k for k, *_ in arch.linear_shapes})}")
    lora_numels = [n for k, i, o, count in targets for n in [lora_r * i, o * lora_r] * count]
    lora_params = sum(lora_numels)
    other = arch.params - arch.linear_params

    if m.base == "full":
        weights = arch.params * a
        trainable = [i * o for k, i, o, n in arch.linear_shapes for _ in range(n)] + [other]
        grads = arch.params * a
    elif m.base == "lora":
        weights = arch.params * a + lora_params * 4
        trainable, grads = lora_numels, lora_params * 4
    else:
        nf4 = sum(nf4_bytes(i * o) * n for k, i, o, n in arch.linear_shapes)
        weights = nf4 + other * 4 + lora_params * 4
        trainable, grads = lora_numels, lora_params * 4
    optimizer = adam_state_bytes(trainable, m.adam_8bit)

    T, s, h, i, d = batch_size * seq_len, seq_len, arch.hidden, arch.intermediate, arch.head_dim
    full = m.base == "full"
    per_layer = T * ((6 if full else 4) * h + 2 * (arch.heads + arch.kv_heads) * d + 4 * i) * a
    per_layer += T * (2 + arch.heads) * 4  # reciprocal RMS and log-sum-exp stay fp32
    lora_per_layer = sum(T * lora_r * count for k, _, _, count in targets) // arch.layers * 4
    if lora_dropout > 0:
        lora_per_layer += sum(T * inp * (a + 1) * count for k, inp, _, count in targets) // arch.layers
    layer = per_layer + lora_per_layer
    head = T * arch.vocab * 4 + 8 * T + (T * (3 * h * a + 4) + 8 * T if full else 0) + 2 * s * d * 4
    logits = T * arch.vocab * 4
    if m.gradient_checkpointing:
        # each layer's input (and, with a frozen embedding, the embedding output made to require grad)
        kept = (arch.layers + (0 if full else 1)) * T * h * a + head
        activations = kept
        # backward through the layers: the head's tensors are gone, one layer is recomputed, the
        # gradients and the hidden states' gradient (x2 while it flows through the residual) are held
        through_layers = kept - head + layer + grads + 2 * T * h * a
    else:
        activations = arch.layers * layer + head
        through_layers = 0
    # start of backward: everything saved, plus the logits the forward returned and their gradient
    peak = weights + optimizer + max(activations + 2 * logits, through_layers)
    return StepMemory(weights=weights, gradients=grads, optimizer=optimizer, activations=activations,
                      peak=peak, source="estimated",
                      details={"trainable_params": arch.params if full else lora_params,
                               "layer_activations": layer, "method": m.label})


# --------------------------------------------------------------------------------------------------
# Experiments of Lab 4: measured next to estimated
# --------------------------------------------------------------------------------------------------
def _rows(method, measured: StepMemory, estimated: StepMemory | None, **keys) -> dict:
    row = {**keys, "method": parse_method(method).label}
    row.update({f"measured {k}": v for k, v in measured.mib().items()})
    if estimated is not None:
        row.update({f"estimated {k}": v for k, v in estimated.mib().items()})
        row["total error (%)"] = 100 * (estimated.total - measured.total) / measured.total
        row["peak error (%)"] = 100 * (estimated.peak - measured.peak) / measured.peak
    row["seconds per step"] = measured.details["seconds"]
    return row


def breakdown_grid(profile, methods=("full", "lora", "qlora", "full+gc", "qlora+gc+8bit"),
                   batch_sizes=(4, 16), seq_lens=(64, 160)):
    """Measure one training step of each method at each batch size x sequence length on the profile's
    base model, next to :func:`estimate_training_step`; one row per run, MiB, with relative errors."""
    import pandas as pd

    from tqdm.auto import tqdm

    arch = profile_architecture(profile)
    rows = []
    bar = tqdm(total=len(methods) * len(batch_sizes) * len(seq_lens), desc="measure steps", unit="run")
    for method in methods:
        model, optimizer = setup_training(method, profile)
        for b in batch_sizes:
            for s in seq_lens:
                bar.update()
                measured = measure_training_step(model, make_batch(arch.vocab, b, s, device=profile.device), optimizer)
                estimated = estimate_for_profile(profile, method, b, s)
                rows.append(_rows(method, measured, estimated, batch_size=b, seq_len=s))
        del model, optimizer
    bar.close()
    return pd.DataFrame(rows)


def profile_architecture(profile) -> Architecture:
    """The :class:`Architecture` of the profile's base model (a shipped size or a hub id)."""
    from labhelpers.models import model_source

    return architecture(model_source(profile.base_model))


def checkpointing_sweep(profile, seq_lens=(64, 128, 256, 512), batch_size: int = 8, method: str = "full",
                        steps: int = 3):
    """Activation memory, peak and time per step with and without gradient checkpointing, per length."""
    import pandas as pd

    arch = profile_architecture(profile)
    rows = []
    for gc in (False, True):
        label = method + ("+gc" if gc else "")
        model, optimizer = setup_training(label, profile)
        for s in seq_lens:
            m = measure_training_step(model, make_batch(arch.vocab, batch_size, s, device=profile.device), optimizer,
                                      steps=steps)
            rows.append({"seq_len": s, "checkpointing": gc, "activations (MiB)": m.activations / MiB,
                         "peak (MiB)": m.peak / MiB, "seconds per step": m.details["seconds"]})
        del model, optimizer
    return pd.DataFrame(rows)


OPTIMIZERS = {"adamw_torch": "torch.optim.AdamW", "adamw_bnb_8bit": "bitsandbytes.optim.AdamW8bit",
              "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit", "paged_adamw_32bit": "bitsandbytes.optim.PagedAdamW32bit"}


def make_optimizer(name: str, params, lr: float = 1e-4):
    """An optimizer by its ``transformers`` ``optim`` name: the class :data:`OPTIMIZERS` names."""
    import importlib

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    module, _, class_name = OPTIMIZERS[name].rpartition(".")
    optimizer_class = getattr(importlib.import_module(module), class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers fall back to ordinary memory off CUDA, and say so
        return optimizer_class(list(params), lr=lr)


def optimizer_memory(profile, optimizers=tuple(OPTIMIZERS), method: str = "full", batch_size: int = 8,
                     seq_len: int = 128):
    """Measured optimizer-state bytes (and the rest of the step) for each optimizer, ``method`` fixed."""
    import pandas as pd

    arch = profile_architecture(profile)
    rows = []
    for name in optimizers:
        model, _ = setup_training(method, profile)
        optimizer = make_optimizer(name, [p for p in model.parameters() if p.requires_grad])
        m = measure_training_step(model, make_batch(arch.vocab, batch_size, seq_len, device=profile.device), optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"optimizer": name, "optimizer states (MiB)": m.optimizer / MiB,
                     "bytes per trainable parameter": m.optimizer / trainable, "peak (MiB)": m.peak / MiB})
        del model, optimizer
    return pd.DataFrame(rows)


def accumulation_table(profile, effective_batch: int = 32, micro_batches=(32, 16, 8, 4), seq_len: int = 128,
                       precisions=(None, "bfloat16"), method: str = "full"):
    """Gradient accumulation and mixed precision: peak memory and time per optimizer step for the same
    effective batch, split into micro-batches, in fp32 and under autocast."""
    import pandas as pd

    arch = profile_architecture(profile)
    model, optimizer = setup_training(method, profile)
    rows = []
    for precision in precisions:
        for micro in micro_batches:
            if effective_batch % micro:
                raise ValueError(f"micro-batch {micro} does not divide the effective batch {effective_batch}")
            m = measure_training_step(model, make_batch(arch.vocab, micro, seq_len, device=profile.device), optimizer,
                                      accumulation_steps=effective_batch // micro, autocast_dtype=precision)
            rows.append({"precision": precision or profile.dtype, "micro-batch": micro,
                         "accumulation steps": effective_batch // micro, "effective batch": effective_batch,
                         "activations (MiB)": m.activations / MiB, "peak (MiB)": m.peak / MiB,
                         "seconds per optimizer step": m.details["seconds"]})
    return pd.DataFrame(rows)


def compare_efficiency(profile, methods=("full", "lora", "qlora", "qlora+gc+8bit"), task: str = "code",
                       steps: int | None = None):
    """Train each method on ``task`` with the same data and steps, then measure one full-length step.

    Returns one row per method: trainable parameters, measured peak of a step at the profile's batch
    size and maximum length (and its estimate), seconds per training step, final loss and test score.
    """
    import gc

    import pandas as pd

    from labhelpers.peft_methods import compare_methods

    arch = profile_architecture(profile)
    batch = make_batch(arch.vocab, profile.batch_size, profile.max_seq_length, device=profile.device)
    from tqdm.auto import tqdm

    rows, curves = [], {}
    for method in tqdm(methods, desc="methods", unit="method"):
        m = parse_method(method)
        run_profile = profile.with_(gradient_checkpointing=m.gradient_checkpointing,
                                    max_steps=steps or profile.max_steps)
        overrides = {"optim": "adamw_bnb_8bit"} if m.adam_8bit else {}
        trained = compare_methods([m.base], run_profile, task=task, overrides=overrides, curves=True)
        model, optimizer = setup_training(m, profile)
        step = measure_training_step(model, batch, optimizer)
        est = estimate_for_profile(profile, m)
        row = trained.iloc[0].to_dict()
        curves[m.label] = row.pop("loss_curve")
        rows.append({"method": m.label, "trainable params": row["trainable_params"],
                     "measured peak (MiB)": step.peak / MiB, "estimated peak (MiB)": est.peak / MiB,
                     "weights (MiB)": step.weights / MiB, "optimizer (MiB)": step.optimizer / MiB,
                     "activations (MiB)": step.activations / MiB, "seconds per step": row["sec_per_step"],
                     "final loss": row["final_train_loss"], "pass@1": row["score_test"]})
        del model, optimizer, trained
        gc.collect()
    return pd.DataFrame(rows), curves


def estimate_for_profile(profile, method: "str | Method", batch_size: int | None = None,
                         seq_len: int | None = None) -> StepMemory:
    """:func:`estimate_training_step` for the profile's base model, dtype and LoRA settings (rank,
    targets, dropout), at ``batch_size`` x ``seq_len`` (default: the profile's batch and maximum length)."""
    return estimate_training_step(profile_architecture(profile), method, batch_size or profile.batch_size,
                                  seq_len or profile.max_seq_length, dtype=profile.dtype, lora_r=profile.lora_r,
                                  lora_targets=profile.target_modules, lora_dropout=profile.lora_dropout)


# --------------------------------------------------------------------------------------------------
# Planning: which method fits which GPU
# --------------------------------------------------------------------------------------------------
PLAN_METHODS = ("full", "full+8bit", "lora", "lora+gc", "qlora", "qlora+gc+8bit")
GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)
CUDA_CONTEXT_GB = 0.5  # CUDA context, kernels and allocator slack on a real GPU


def plan(model_size, gpu_memory_gb: float, methods=PLAN_METHODS, batch_size: int = 1, seq_len: int = 2048,
         dtype: str = "bfloat16", lora_r: int = 16, headroom: float = 0.9):
    """Which training methods fit a GPU of ``gpu_memory_gb`` for a model, with the estimate broken down.

    ``model_size``: a size label (``"1B"``, ``"3B"``, ``"7B"``, ``"13B"``, ``"70B"``), a shipped
    architecture name, a ``config.json`` path or an :class:`Architecture`. A method fits when its
    estimated peak plus the CUDA context stays within ``headroom`` of the GPU's memory.
    Returns a DataFrame, one row per method, sizes in GB (1e9 bytes, as GPUs are sold).
    """
    import pandas as pd

    _check_positive(gpu_memory_gb=gpu_memory_gb, batch_size=batch_size, seq_len=seq_len)
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    arch = model_size if isinstance(model_size, Architecture) else architecture(model_size)
    rows = []
    for method in methods:
        est = estimate_training_step(arch, method, batch_size, seq_len, dtype=dtype, lora_r=lora_r)
        need = est.peak / 1e9 + CUDA_CONTEXT_GB
        rows.append({"model": arch.name, "params (B)": round(arch.billions, 2), "method": parse_method(method).label,
                     "weights (GB)": est.weights / 1e9, "gradients (GB)": est.gradients / 1e9,
                     "optimizer (GB)": est.optimizer / 1e9, "activations (GB)": est.activations / 1e9,
                     "peak (GB)": need, "gpu (GB)": gpu_memory_gb, "fits": need <= headroom * gpu_memory_gb})
    return pd.DataFrame(rows)


def plan_grid(sizes=tuple(SIZE_LABELS), gpus=GPU_SIZES_GB, methods=PLAN_METHODS, **kwargs):
    """The planner over model sizes x methods: peak GB per row, one boolean column per GPU size."""
    import pandas as pd

    frames = []
    for size in sizes:
        table = plan(size, max(gpus), methods, **kwargs)
        for gpu in gpus:
            _check_positive(gpu_memory_gb=gpu)
            table[f"fits {gpu} GB"] = table["peak (GB)"] <= kwargs.get("headroom", 0.9) * gpu
        frames.append(table.drop(columns=["gpu (GB)", "fits"]).assign(size=size))
    return pd.concat(frames, ignore_index=True)


ZERO_STAGES = {0: "DDP (no sharding)", 1: "ZeRO-1: optimizer states", 2: "ZeRO-2 / FSDP SHARD_GRAD_OP: + gradients",
               3: "ZeRO-3 / FSDP FULL_SHARD: + parameters"}


def zero_per_gpu(params: float, n_gpus: int, stage: int, weight_bytes: int = 2, grad_bytes: int = 2,
                 optimizer_bytes: int = 12) -> dict[str, float]:
    """Bytes per GPU of model states under ZeRO stage ``stage`` (Rajbhandari et al., 2020).

    With mixed-precision AdamW, each parameter costs 2 (bf16 weight) + 2 (gradient) + K = 12 (fp32
    master weight and two moments) bytes. Stage 1 shards the K optimizer bytes over ``n_gpus``,
    stage 2 also the gradients, stage 3 also the weights:
    ``(2 + 2 + K) Ψ``, ``(2 + 2) Ψ + KΨ/N``, ``2Ψ + (2 + K)Ψ/N``, ``(2 + 2 + K)Ψ/N``.
    Activations are not sharded (each GPU runs its own micro-batch).
    """
    _check_positive(params=params, n_gpus=n_gpus)
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {sorted(ZERO_STAGES)}, got {stage!r}")
    n = n_gpus
    return {"weights": params * weight_bytes / (n if stage >= 3 else 1),
            "gradients": params * grad_bytes / (n if stage >= 2 else 1),
            "optimizer": params * optimizer_bytes / (n if stage >= 1 else 1)}


# --------------------------------------------------------------------------------------------------
# Before a run: will it fit?
# --------------------------------------------------------------------------------------------------
class DoesNotFitWarning(UserWarning):
    """The estimated peak memory of a training run exceeds what the device has free."""


def available_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA's free memory, or the machine's available RAM."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(model, method: "str | Method", batch_size: int, seq_len: int, device: str, dtype: str = "float32",
               lora_r: int = 16, available: int | None = None) -> StepMemory:
    """Estimate a run's peak and warn (:class:`DoesNotFitWarning`) when ``device`` cannot hold it.

    The warning names the estimate, the free memory and what to try. Returns the estimate.
    Models whose config cannot be read (not a decoder-only transformer) are not checked.
    """
    try:
        arch = architecture(model)
    except Exception:  # noqa: BLE001 - any model we cannot describe is simply not checked
        return None
    est = estimate_training_step(arch, method, batch_size, seq_len, dtype=dtype, lora_r=lora_r)
    free = available_bytes(device) if available is None else available
    if est.peak > free:
        warnings.warn(
            f"this run will not fit: {parse_method(method).label} on {arch.name} with batch {batch_size} x "
            f"{seq_len} tokens needs about {est.peak / GiB:.2f} GiB, but {device} has {free / GiB:.2f} GiB free. "
            "Lower the batch size or sequence length, enable gradient checkpointing, or use LoRA/QLoRA "
            "(see labhelpers.memory.plan).", DoesNotFitWarning, stacklevel=2)
    return est


class DoesNotFitError(MemoryError):
    """A run's estimated peak memory exceeds what the device has free (see :func:`require_fits`)."""


def require_fits(model, method: "str | Method", batch_size: int, seq_len: int, device: str, dtype: str = "float32",
                 lora_r: int = 16, available: int | None = None) -> StepMemory:
    """Like :func:`check_fits`, but raise :class:`DoesNotFitError` (naming the need, the free memory
    and what to change) instead of warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = check_fits(model, method, batch_size, seq_len, device, dtype, lora_r=lora_r, available=available)
    for w in caught:
        if issubclass(w.category, DoesNotFitWarning):
            raise DoesNotFitError(str(w.message))
    return est
