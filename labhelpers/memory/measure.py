"""Measure the memory of training on the real model: peak of a block, bytes by part, one step.

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
CUDA ``torch.cuda.max_memory_allocated``); :func:`measure_peak_memory` is the one peak measure every
lab and benchmark uses.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from labhelpers.units import MiB, to_mib

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PeakMemory:
    """Filled in when the ``measure_peak_memory`` block exits.

    ``peak_mib``: on CUDA ``torch.cuda.max_memory_allocated`` during the block; on CPU the highest
    resident set size sampled every ``interval_s``, minus the resident size when the block began
    (so it counts what the block added, not the interpreter and libraries already loaded).
    """

    device: str
    peak_mib: float = 0.0


_OPEN_CUDA_PEAKS: list[list[int]] = []  # running maxima of the CUDA measure_peak_memory blocks in progress


def reset_cuda_peak(device=None) -> None:
    """``torch.cuda.reset_peak_memory_stats``, after handing the peak so far to every CUDA
    :func:`measure_peak_memory` block in progress: torch keeps one peak per device, so a measurement
    inside another (a lab's training step inside a smoke run's block) would otherwise erase the outer one."""
    current = torch.cuda.max_memory_allocated(device)
    for running in _OPEN_CUDA_PEAKS:
        running[0] = max(running[0], current)
    torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def measure_peak_memory(device: str = "cpu", interval_s: float = 0.005):
    """Context manager yielding a :class:`PeakMemory` for the work inside the block (blocks may nest)."""
    import psutil

    result = PeakMemory(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        reset_cuda_peak()
        start = torch.cuda.memory_allocated()
        running = [start]
        _OPEN_CUDA_PEAKS.append(running)
        try:
            yield result
        finally:
            _OPEN_CUDA_PEAKS.remove(running)
        torch.cuda.synchronize()
        result.peak_mib = to_mib(max(running[0], torch.cuda.max_memory_allocated()) - start)
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
    ``peak`` is the most bytes held at once: the weights and optimizer states plus the peak of what
    the step itself allocates (on CUDA from the allocator's peak over what was allocated when the step
    began, so neither the batch nor what an earlier model left behind counts; elsewhere from a dispatch
    mode that follows every tensor created during the step).

    ``accumulation_steps``: forward/backward passes per optimizer step (gradient accumulation: the
    batch is each micro-batch, gradients add up, the step sees ``accumulation_steps`` x the batch).
    ``autocast_dtype``: ``"bfloat16"``/``"float16"`` runs forward and backward under ``torch.autocast``
    (mixed precision: matmuls in 16 bits, weights and optimizer in fp32).
    ``details`` holds ``seconds`` and the loss. ``seconds`` is of a step that ran without the dispatch
    mode (it follows every operation in Python): the last step on CUDA, the one before it elsewhere
    (the last one when ``steps`` is 1).
    """
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

    cuda = device.type == "cuda"
    result, seconds = None, None
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        last = step == steps - 1
        mode = _null()
        if last:  # what already exists (weights, optimizer states) is not counted again by the tracker
            static_bytes = weight_bytes(model) + optimizer_state_bytes(optimizer)
            if not cuda:
                static = {_storage_key(t) for t in weight_tensors(model)}
                static |= {_storage_key(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
                mode = _live_tensor_mode()(static)
        if cuda:
            torch.cuda.synchronize()
            reset_cuda_peak(device)
            allocated = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with mode:
            for _ in range(accumulation_steps):
                with saved_activations(model) as saved, autocast():
                    loss = model(**batch).loss / accumulation_steps
                loss.backward()
            grads = gradient_bytes(model)
            optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if cuda or not last or seconds is None:  # the tracked step is timed only when it is the only one
            seconds = time.perf_counter() - start
        if last:
            transient = torch.cuda.max_memory_allocated(device) - allocated if cuda else mode.peak
            result = StepMemory(weights=weight_bytes(model), gradients=grads,
                                optimizer=optimizer_state_bytes(optimizer), activations=saved.bytes,
                                peak=static_bytes + transient,
                                details={"seconds": seconds, "loss": float(loss.detach()) * accumulation_steps})
    optimizer.zero_grad(set_to_none=True)
    return result


@contextmanager
def _null():
    yield


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
