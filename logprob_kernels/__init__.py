"""Fused log-probs of target tokens from hidden states and the lm_head, without [N, V] logits."""

from .logprobs import fused_logprobs, reference_logprobs

__all__ = ["fused_logprobs", "reference_logprobs"]
