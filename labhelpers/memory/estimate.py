"""The analytical estimate of one training step's memory, from an architecture and a method, and the
ZeRO / FSDP sharding formulas. This is the only estimator in the package: planners and guidance
tables call it."""

from __future__ import annotations

import math

from labhelpers.memory.architectures import Architecture, architecture, profile_architecture
from labhelpers.memory.measure import DTYPE_BYTES, StepMemory, _check_positive
from labhelpers.peft_methods import TrainingMethod, parse_method

NF4_BLOCKSIZE, NESTED_BLOCKSIZE, ADAM8_BLOCKSIZE, ADAM8_MIN_SIZE = 64, 256, 256, 4096
ESTIMATED_METHODS = ("full", "lora", "qlora")  # the PEFT methods whose memory the estimator models
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")  # the linears that read the input norm's output
SHARED_INPUTS = (ATTENTION_INPUTS, ("gate_proj", "up_proj"))  # linears that read the same tensor


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


def estimate_training_step(arch: "Architecture | str", method: "str | TrainingMethod", batch_size: int, seq_len: int,
                           dtype: str = "float32", lora_r: int = 16,
                           lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"),
                           lora_dropout: float = 0.0, device: str = "cuda") -> StepMemory:
    """Predict the bytes of one training step from the architecture alone.

    Weights: parameters in ``dtype`` (full fine-tuning in float16: fp32 master weights; QLoRA: decoder linears in NF4 with double quantization, the
    rest in fp32 as ``prepare_model_for_kbit_training`` leaves them). Gradients and AdamW states:
    for the trainable parameters (all, or the LoRA matrices ``r x in`` and ``out x r`` per target).

    Activations, with ``T = batch_size x seq_len`` tokens, per decoder layer. Full fine-tuning (elements):

    * two RMSNorms: input, normalized output and the output once more for the weight's gradient:
      ``6Th``, plus ``2T`` reciprocal RMS values;
    * attention: queries and output with ``n_heads``, keys and values with ``n_kv_heads`` heads
      (``2T(n + n_kv) d``), the log-sum-exp of the softmax (``T n``);
    * MLP: gate, SiLU(gate), up and their product: ``4 T i``.

    LoRA and QLoRA train only the adapters, and a frozen linear layer saves no input (its weight gets
    no gradient). What they save, in bytes, with ``a`` the profile's dtype (the autocast dtype of
    mixed-precision training) and ``s`` the residual stream's (``a`` for LoRA; fp32 for QLoRA, whose
    norms ``prepare_model_for_kbit_training`` leaves in fp32 and whose 4-bit layers return their
    input's dtype):

    * each RMSNorm its input upcast to fp32 (``4Th``) and ``T`` reciprocal RMS values;
    * attention as above, in ``a``;
    * MLP: gate, up and SiLU(gate), ``3Ti`` in ``s`` (the product feeds a frozen ``down_proj``);
    * each target: the input of ``A`` (``T · in``, cast by peft to the fp32 adapter and back to ``a`` by
      autocast; in fp32 without dropout there is no copy: the query, key and value projections share
      one, as do gate and up, and the output projection's is the attention output) and of ``B`` (``T r``); with dropout its mask, one byte per element on CUDA (bool),
      four on a CPU (fp32 noise): ``device``. The first layer's input norm saves nothing (no gradient
      reaches the frozen embedding), nor do the dropout masks of its query, key and value projections.

    plus the log-softmax of the logits (``T V``, fp32), the final norm, the labels (and input ids when
    the embedding trains) as int64, RoPE's cos/sin (``2 s d``) and, in 16 bits, autocast's copies of
    the fp32 adapters and, for QLoRA, of the fp32 output embedding (``V h a``).
    With gradient checkpointing only each layer's input is kept (``L T h``, in ``s``) and one layer's
    activations are recomputed at a time during backward.

    ``peak`` adds what is alive but not saved: the logits the forward pass returns and their
    gradient at the start of backward (``2 T V`` fp32); with checkpointing, the larger of that and
    the backward pass through the layers (one recomputed layer, the gradients, the hidden state's
    gradient).
    """
    arch = arch if isinstance(arch, Architecture) else architecture(arch)
    m = parse_method(method, ESTIMATED_METHODS)
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

    if m.base == "full":  # under fp16 mixed precision the trained weights are fp32 (training.keep_trainable_fp32)
        master = 4 if dtype == "float16" else a
        weights = arch.params * master
        trainable = [i * o for k, i, o, n in arch.linear_shapes for _ in range(n)] + [other]
        grads = arch.params * master
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
    attention = T * 2 * (arch.heads + arch.kv_heads) * d * a + T * (2 + arch.heads) * 4  # + rstd, log-sum-exp
    logits = T * arch.vocab * 4
    rope = 2 * s * d * 4
    if full:
        stream = a
        layer = T * (6 * h + 4 * i) * a + attention
        head = logits + 8 * T + T * (3 * h * a + 4) + 8 * T + rope
        edge_correction = 0
    else:
        stream = 4 if m.base == "qlora" else a
        mask = (1 if device.startswith("cuda") else 4) if lora_dropout > 0 else 0
        inputs = {k: inp * count for k, inp, _, count in targets}  # elements of A's input, per target
        if a == 4 and not mask:  # no cast and no dropout: targets that read the same tensor save it once
            for group in SHARED_INPUTS:
                for k in [k for k in group if k in inputs][1:]:
                    inputs[k] = 0
            inputs.pop("o_proj", None)  # the attention's output, which attention saves already
        adapters = (T * (a + mask) * sum(inputs.values())
                    + sum(T * lora_r * a * count for *_, count in targets)) // arch.layers
        layer = T * 2 * h * 4 + attention + 3 * T * i * stream + adapters
        # autocast's 16-bit copies of fp32 weights, made once per forward: the adapters, and QLoRA's embedding
        autocast_copies = (lora_params + (arch.vocab * h if m.base == "qlora" else 0)) * a if a < 4 else 0
        head = logits + 8 * T + rope + autocast_copies
        # without checkpointing the final norm saves its input (with it, that is the last kept tensor),
        # and the first layer's input norm and its q, k, v dropout masks save nothing
        edge_correction = -sum(T * inp * mask for k, inp, _, _ in targets if k in ATTENTION_INPUTS)
    if m.gradient_checkpointing:
        # each layer's input (the first is the embedding's output, made to require grad when it is frozen)
        kept = arch.layers * T * h * stream + head
        activations = kept
        # backward through the layers: the head's tensors are gone, one layer is recomputed, the
        # gradients and the hidden states' gradient (x2 while it flows through the residual) are held
        through_layers = kept - head + layer + grads + 2 * T * h * stream
    else:
        activations = arch.layers * layer + head + edge_correction
        through_layers = 0
    # start of backward: everything saved, plus the logits the forward returned and their gradient
    peak = weights + optimizer + max(activations + 2 * logits, through_layers)
    return StepMemory(weights=weights, gradients=grads, optimizer=optimizer, activations=activations,
                      peak=peak, source="estimated",
                      details={"trainable_params": arch.params if full else lora_params,
                               "layer_activations": layer, "method": m.label})


def estimate_for_profile(profile, method: "str | TrainingMethod", batch_size: int | None = None,
                         seq_len: int | None = None, arch: Architecture | None = None,
                         device: str | None = None) -> StepMemory:
    """:func:`estimate_training_step` for the profile's base model (or ``arch``), dtype and LoRA
    settings (rank, targets, dropout), at ``batch_size`` x ``seq_len`` (default: the profile's batch
    and maximum length), on ``device`` (default: the profile's)."""
    return estimate_training_step(arch or profile_architecture(profile), method, batch_size or profile.batch_size,
                                  seq_len or profile.max_seq_length, dtype=profile.dtype, lora_r=profile.lora_r,
                                  lora_targets=profile.target_modules, lora_dropout=profile.lora_dropout,
                                  device=device or profile.device)


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
