"""The policy update: the reference's PPO loss over a batch of trajectories, flat or tree-packed.

One package, one file per job; the loss knows no tree and no server:

- ``loss.py``: aggregation, KL estimators, the dual-clip PPO loss and its packed closed form;
- ``logprobs.py``: the model body to hidden states, then chunked lm_head + log-softmax;
- ``mask.py``: the tree attention mask (the one implementation of the packed layout's rule);
- ``batches.py``: the flat and the packed micro-batch, each with its own fields and loss;
- ``plan.py``: micro-batches from a :class:`treegrpo.Pack` and its ``layout`` (Rust);
- ``sharding.py``: FSDP2 wrapping;
- ``learner.py``: :class:`Learner`, the step (old log-probs, updates, optimizer, schedule).

:class:`LearnerConfig` lives in :mod:`treegrpo.config` with every other section.
"""

from treegrpo.config import LearnerConfig
from treegrpo.learner.batches import FlatMicroBatch, MicroBatch, PackedMicroBatch, StepBatch
from treegrpo.learner.learner import Learner, NonFiniteLossError
from treegrpo.learner.logprobs import token_log_probs
from treegrpo.learner.loss import agg_loss, kl_penalty
from treegrpo.learner.mask import tree_attention_mask

__all__ = [
    "FlatMicroBatch",
    "Learner",
    "LearnerConfig",
    "MicroBatch",
    "NonFiniteLossError",
    "PackedMicroBatch",
    "StepBatch",
    "agg_loss",
    "kl_penalty",
    "token_log_probs",
    "tree_attention_mask",
]
