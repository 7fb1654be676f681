"""Generation engines: the embedded transformers engine and the SGLang client."""

from treegrpo.engine.base import (
    Completion,
    Engine,
    FinishReason,
    GenerateRequest,
    PolicySource,
    SamplingParams,
    WeightSync,
)

__all__ = [
    "Completion",
    "Engine",
    "FinishReason",
    "GenerateRequest",
    "PolicySource",
    "SamplingParams",
    "WeightSync",
]
