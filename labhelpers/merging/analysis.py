"""Task vectors and how two of them interfere; how much of each expert's skill a merge keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from labhelpers.evaluation import retention
from labhelpers.merging.io import Checkpoint, check_compatible
from labhelpers.merging.maths import trim


def task_vectors(base: str | Path, experts: Mapping[str, str | Path], skip_embeddings: bool = False):
    """Statistics of each expert's task vector, tensor by tensor, as a DataFrame: ``expert``, ``tensor``,
    ``numel``, ``norm`` (L2 of :math:`\\tau`), ``relative`` (``norm`` / L2 of the base tensor)."""
    base_ckpt = Checkpoint(base)
    rows = []
    for label, folder in experts.items():
        ckpt = Checkpoint(folder)
        check_compatible(base_ckpt, [ckpt])
        for name in base_ckpt.tensors:
            if skip_embeddings and "embed" in name:
                continue
            b = base_ckpt[name].float()
            delta = ckpt[name].float() - b
            rows.append({"expert": label, "tensor": name, "numel": delta.numel(), "norm": delta.norm().item(),
                         "relative": (delta.norm() / b.norm().clamp_min(1e-12)).item()})
    return pd.DataFrame(rows)


def interference(base: str | Path, a: str | Path, b: str | Path, density: float = 0.2):
    """How two task vectors overlap, per tensor: cosine similarity, the fraction of entries where both
    change with opposite signs (``sign_conflict``), and the overlap of their top-``density`` entries
    (``topk_overlap``, Jaccard). A DataFrame with one row per tensor and a row ``all``."""
    base_ckpt, ca, cb = Checkpoint(base), Checkpoint(a), Checkpoint(b)
    check_compatible(base_ckpt, [ca, cb])
    rows, ta_all, tb_all = [], [], []
    for name in base_ckpt.tensors:
        b0 = base_ckpt[name].float()
        ta, tb = (ca[name].float() - b0).flatten(), (cb[name].float() - b0).flatten()
        ta_all.append(ta)
        tb_all.append(tb)
        rows.append({"tensor": name, **_overlap(ta, tb, density)})
    rows.append({"tensor": "all", **_overlap(torch.cat(ta_all), torch.cat(tb_all), density)})
    return pd.DataFrame(rows)


def _overlap(ta: torch.Tensor, tb: torch.Tensor, density: float) -> dict[str, float]:
    both = (ta != 0) & (tb != 0)
    conflict = both & (torch.sign(ta) != torch.sign(tb))
    ka, kb = trim(ta, density) != 0, trim(tb, density) != 0
    union = (ka | kb).sum().item()
    return {"cosine": torch.nn.functional.cosine_similarity(ta, tb, dim=0).item(),
            "sign_conflict": conflict.sum().item() / max(1, both.sum().item()),
            "topk_overlap": (ka & kb).sum().item() / max(1, union)}


def preservation(table, expert_scores: Mapping[str, Mapping[str, float]]):
    """Add ``<task>_kept`` = the :func:`~labhelpers.evaluation.retention` of each merge's score against
    the score of that task's own expert (capability preservation; 1.0 where the expert scores 0)."""
    out = table.copy()
    for task, scores in expert_scores.items():
        out[f"{task}_kept"] = [retention(float(v), float(scores[task])) for v in out[task]]
    return out
