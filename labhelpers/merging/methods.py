"""The merge methods as a registry: one class per method says what it needs (a base, a number of
models, its knobs), checks them, gathers the whole-tensor statistics a chunked merge needs, merges
one tensor and names itself in mergekit. A new method is one class added to :data:`REGISTRY`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from labhelpers.merging.io import DTYPES
from labhelpers.merging.maths import (_check_density, _check_weights, dare_generators, dare_merge, kth_largest, linear,
                                      slerp, task_arithmetic, ties, trim_count)


class MergeMethod:
    """One merge method. ``apply`` works on float32 tensors; :func:`merge_tensor` does the casting."""

    name: str = ""
    needs_base: bool = False  # merges task vectors (expert - base), so needs the base
    n_models: int | None = None  # exactly this many models (None: at least one)
    mergekit_name: str = ""

    def validate(self, n_models: int, has_base: bool, knobs: Mapping) -> None:
        """Raise ValueError naming what is missing or out of range, and how to fix it."""
        if self.needs_base and not has_base:
            raise ValueError(f"{self.name} merges task vectors and needs base= (the checkpoint the experts were "
                             "tuned from)")
        if n_models < 1 or (self.n_models is not None and n_models != self.n_models):
            raise ValueError(f"{self.name} got {n_models} models; slerp needs exactly 2, the others at least 1")
        _check_weights(knobs.get("weights"), n_models)
        self.check_knobs(knobs)

    def check_knobs(self, knobs: Mapping) -> None:
        """The method's own knobs (weights are checked for every method)."""

    def statistics(self, name: str, base, experts: Sequence, knobs: Mapping, n: int, chunk: int) -> dict:
        """What merging tensor ``name`` chunk by chunk needs to know about the whole tensor (``n``
        elements), read from ``base`` and ``experts`` (checkpoints: ``.elements(name, start, stop)``)."""
        return {}

    def apply(self, name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor], knobs: Mapping) -> torch.Tensor:
        raise NotImplementedError

    def mergekit_model_parameters(self, knobs: Mapping) -> dict:
        """Per-model parameters of mergekit's config, besides the weight."""
        return {}

    def mergekit_parameters(self, knobs: Mapping) -> dict:
        """The config's global ``parameters``."""
        return {}

    def mergekit(self, models: Sequence[str], weights: Sequence[float], base: str | None, knobs: Mapping) -> dict:
        """This merge as a mergekit config (without ``dtype``)."""
        entries = [{"model": str(m), "parameters": {"weight": w, **self.mergekit_model_parameters(knobs)}}
                   for m, w in zip(models, weights)]
        config: dict = {"merge_method": self.mergekit_name or self.name, "models": entries}
        if base is not None:
            config["base_model"] = str(base)
        if parameters := self.mergekit_parameters(knobs):
            config["parameters"] = parameters
        return config


class Linear(MergeMethod):
    name = "linear"

    def apply(self, name, base, experts, knobs):
        return linear(experts, knobs.get("weights"))

    def mergekit_parameters(self, knobs):
        return {"normalize": True}


class TaskArithmetic(MergeMethod):
    name, needs_base = "task_arithmetic", True

    def apply(self, name, base, experts, knobs):
        return task_arithmetic(base, experts, knobs.get("weights"), knobs.get("lam", 1.0))

    def mergekit_parameters(self, knobs):
        return {"lambda": float(knobs.get("lam", 1.0))}


class Slerp(MergeMethod):
    name, n_models = "slerp", 2

    def check_knobs(self, knobs):
        if "t" not in knobs:
            raise ValueError("slerp needs t= in [0, 1]")
        if not 0.0 <= knobs["t"] <= 1.0:
            raise ValueError(f"t must be in [0, 1] (0 = first model, 1 = second), got {knobs['t']}")

    def statistics(self, name, base, experts, knobs, n, chunk):
        sums = torch.zeros(3, dtype=torch.float64)
        for start in range(0, n, chunk):
            a, b = (c.elements(name, start, min(n, start + chunk)).double() for c in experts)
            sums += torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])
        na, nb = sums[0].sqrt(), sums[1].sqrt()
        cos = sums[2] / (na * nb) if na > 0 and nb > 0 else torch.zeros((), dtype=torch.float64)
        return {"geometry": (na.float(), nb.float(), cos.float())}

    def apply(self, name, base, experts, knobs):
        if len(experts) != 2:
            raise ValueError(f"slerp merges exactly 2 models, got {len(experts)}")
        return slerp(experts[0], experts[1], knobs["t"], geometry=knobs.get("geometry"))

    def mergekit(self, models, weights, base, knobs):
        # mergekit's slerp interpolates from its base_model (t = 0) to the other model
        return {"merge_method": "slerp", "base_model": str(models[0]), "models": [{"model": str(m)} for m in models],
                "parameters": {"t": float(knobs["t"])}}


class _Sparsifying(MergeMethod):
    """TIES and DARE keep a ``density`` fraction of each task vector."""

    needs_base = True

    def check_knobs(self, knobs):
        if "density" not in knobs:
            raise ValueError(f"{self.name} needs density= in (0, 1]")
        _check_density(knobs["density"])

    def mergekit_model_parameters(self, knobs):
        return {"density": float(knobs["density"])}


class Ties(_Sparsifying):
    name = "ties"

    def statistics(self, name, base, experts, knobs, n, chunk):
        # each task vector's trim threshold, from one float32 buffer of its magnitudes (the one
        # whole-tensor buffer a streamed merge holds)
        k = trim_count(n, knobs["density"])
        if k is None:
            return {"thresholds": [None] * len(experts)}
        thresholds = []
        for expert in experts:
            magnitudes = torch.empty(n, dtype=torch.float32)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                torch.sub(expert.elements(name, start, stop).float(), base.elements(name, start, stop).float(),
                          out=magnitudes[start:stop]).abs_()
            thresholds.append(kth_largest(magnitudes, k, chunk))
            del magnitudes
        return {"thresholds": thresholds}

    def apply(self, name, base, experts, knobs):
        return ties(base, experts, knobs["density"], knobs.get("weights"), knobs.get("lam", 1.0),
                    knobs.get("thresholds"))

    def mergekit_parameters(self, knobs):
        return {"lambda": float(knobs.get("lam", 1.0)), "normalize": True}


class Dare(_Sparsifying):
    name = "dare"

    def statistics(self, name, base, experts, knobs, n, chunk):
        return {"generators": dare_generators(knobs.get("seed", 0), name, len(experts))}

    def apply(self, name, base, experts, knobs):
        return dare_merge(base, experts, knobs["density"], knobs.get("weights"), knobs.get("lam", 1.0),
                          knobs.get("seed", 0), name, knobs.get("sign_election", False), knobs.get("generators"))

    def mergekit(self, models, weights, base, knobs):
        config = super().mergekit(models, weights, base, knobs)
        config["merge_method"] = "dare_ties" if knobs.get("sign_election") else "dare_linear"
        return config

    def mergekit_parameters(self, knobs):
        return {"lambda": float(knobs.get("lam", 1.0))}


REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (Linear(), TaskArithmetic(), Slerp(), Ties(), Dare())}
METHODS = tuple(REGISTRY)
NEEDS_BASE = {name: method.needs_base for name, method in REGISTRY.items()}


def get_method(name: str) -> MergeMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown merge method {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_merge(method: str, n_models: int, has_base: bool, knobs: Mapping) -> None:
    """Refuse a merge whose method, models, base or knobs do not fit together, before any file is read."""
    get_method(method).validate(n_models, has_base, knobs)


def merge_tensor(method: str, name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor], **knobs) -> torch.Tensor:
    """Apply a registered method to tensor ``name`` (float32 maths, cast back to the experts' dtype)."""
    dtype = experts[0].dtype
    if not dtype.is_floating_point:  # integer buffers are copied from the first model
        return experts[0].clone()
    return get_method(method).apply(name, base.float() if base is not None else None, [e.float() for e in experts],
                                    knobs).to(dtype)


def tensor_statistics(method: str, name: str, base, experts: Sequence, knobs: Mapping, chunk: int) -> dict:
    """The whole-tensor statistics a chunked merge of tensor ``name`` needs (see each method's
    ``statistics``): TIES' trim thresholds, SLERP's norms and cosine, DARE's random generators."""
    if not DTYPES[experts[0].tensors[name].dtype].is_floating_point:
        return {}
    return get_method(method).statistics(name, base, experts, knobs, math.prod(experts[0].tensors[name].shape), chunk)
