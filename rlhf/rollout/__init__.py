"""Rollout engines and the token layout of a rollout batch.

`RolloutEngine` (rlhf.rollout.engine) is what the on-policy trainer samples through:
`generate(prompts, n) -> Rollout` and `sync_weights(policy)`. `HFEngine` runs the
policy's own engine, decoding with its Hugging Face forward and key/value cache
(rlhf.rollout.hf: the decoding loop and sampler, the ZeRO-3 gather-once, the action
mask, the scoring passes). `VLLMEngine` (rlhf.rollout.vllm, `rollout.engine: vllm`)
samples with vLLM, its weights pushed from the policy after every update; imported
from there, since vllm is optional.
"""

from rlhf.rollout.engine import HFEngine, Rollout, RolloutEngine
from rlhf.rollout.hf import (SamplingSteps, action_mask_from_response, as_stop_ids, end_at_eos, full_sequence,
                             generate, generation_context, is_stop, response_logprobs,
                             response_values, sample_from_scores, sample_responses, torch_linear)

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingSteps", "action_mask_from_response", "as_stop_ids",
           "end_at_eos", "full_sequence", "generate", "generation_context", "is_stop",
           "response_logprobs", "response_values", "sample_from_scores", "sample_responses", "torch_linear"]
