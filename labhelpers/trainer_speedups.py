"""What makes our training step cheaper than TRL's default, with the same result: batches grouped by
length (less padding) and a loss computed on the trained positions only (the LM head skips the
prompt). :func:`labhelpers.training.trainer_class` switches both on; ``make bench`` measures them."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from labhelpers.models import unwrap_peft


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Row indices, a batch at a time, for batches of rows of similar length, in random order.

    Each epoch: a random permutation of the rows is cut into groups of ``group`` batches, each group
    is sorted by length and cut into batches, and the batches are shuffled across the whole epoch
    (the one short batch, if any, comes last so that the data loader's batches stay aligned). Every
    row is seen once per epoch, as with random sampling, but a batch is padded to less than random
    batches are (padding by group size: ``docs/measurements.md``). Unlike transformers'
    ``LengthGroupedSampler``, the batches of a group are not served longest to shortest, which would
    give every run a length curriculum. The order depends only on
    ``seed`` and the epoch, so a resumed run sees the batches an uninterrupted one would.

    Every profile uses ``group=4`` (``Profile.length_group``). Large groups change what training
    reaches: a batch then holds rows of one length band, on the SQL task mostly one kind of query
    (``docs/measurements.md``). ``make bench`` measures the speed it buys.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 4) -> None:
        self.lengths, self.batch_size, self.seed, self.group, self.epoch = list(lengths), batch_size, seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are served."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.group
        full, short = [], []
        for start in range(0, len(perm), size):
            rows = sorted(perm[start:start + size], key=lambda i: -self.lengths[i])
            for k in range(0, len(rows), self.batch_size):
                batch = rows[k:k + self.batch_size]
                (full if len(batch) == self.batch_size else short).append(batch)
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short

    def __iter__(self):
        for batch in self.batches():
            yield from batch


# Causal LMs whose forward is ``lm_head(decoder(...).last_hidden_state)`` followed by transformers'
# causal-LM cross-entropy (no logit scaling or soft-capping), so the head can be applied to a subset of positions.
PLAIN_HEAD_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


# peft methods whose adapters live inside the layers and whose forward adds nothing to the loss
# (AdaLoRA adds an orthogonality penalty in its forward; prompt learning changes the inputs).
LAYER_ONLY_PEFT_TYPES = frozenset({"LORA", "IA3"})


def supports_trained_positions_loss(model) -> bool:
    """Whether :func:`trained_positions_loss` computes ``model``'s own loss: a causal LM in
    :data:`PLAIN_HEAD_CAUSAL_LMS`, bare or inside a ``peft`` model of a :data:`LAYER_ONLY_PEFT_TYPES`
    method (LoRA, DoRA, QLoRA, IA3)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None:
        if str(getattr(config.peft_type, "value", config.peft_type)) not in LAYER_ONLY_PEFT_TYPES:
            return False
    return type(unwrap_peft(model)).__name__ in PLAIN_HEAD_CAUSAL_LMS


def trained_positions_loss(model, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    r"""The causal-LM loss of ``model(**inputs)``, with the output layer applied only where a token is trained.

    The model's own forward projects every position onto the vocabulary and then ignores the positions
    labelled -100 (the prompt and the padding); this runs the decoder, keeps the hidden states whose
    next-token label is trained, and applies the head and the cross-entropy to those alone:

    .. math:: \mathcal{L} = \frac{1}{N}\sum_{t:\,y_{t+1} \neq -100} -\log \operatorname{softmax}(W h_t)_{y_{t+1}}

    with :math:`N` = ``num_items_in_batch`` (the trained tokens of the whole accumulated batch, as
    transformers' loss divides by it) or, when None, the trained tokens of this batch. Equal to the
    model's loss in value and gradients (tested), cheaper where few positions are trained
    (``docs/measurements.md``, ``make bench``). ``model`` must pass
    :func:`supports_trained_positions_loss`.
    """
    base = unwrap_peft(model)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs["use_cache"] = False
    hidden = base.get_decoder()(**inputs).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][trained]).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets[trained])
    loss = F.cross_entropy(logits, targets[trained], reduction="sum")
    return loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
