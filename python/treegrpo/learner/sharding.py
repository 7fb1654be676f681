"""FSDP2 wrapping of the policy (``LearnerConfig.strategy == "fsdp2"``)."""

from __future__ import annotations

from treegrpo.exceptions import InvalidOptionError
from treegrpo.learner.logprobs import TokenLogProbs

__all__ = ["fully_shard"]


def fully_shard(policy: TokenLogProbs) -> None:
    """FSDP2 over the default process group: one unit per decoder layer, the rest (embeddings,
    tied lm_head, final norm) in the root unit. Gradients are summed over ranks, not averaged:
    each rank's loss is already normalised by the union batch's normaliser."""
    from torch.distributed.fsdp import fully_shard as shard

    layers = getattr(policy.model.base_model, "layers", None)
    if layers is None:
        raise InvalidOptionError(
            f"strategy='fsdp2' shards each decoder layer of model.base_model.layers, which "
            f"{type(policy.model).__name__} does not have: use strategy='ddp'"
        )
    units = [shard(layer) for layer in layers]
    units.append(shard(policy))
    for unit in units:  # a plain SUM (gloo has no pre-multiplied sum)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
