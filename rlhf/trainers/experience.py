"""What the on-policy loop hands around: `Experience` (one rank's share of a rollout batch
and all that is computed about it) and `Algorithm`, the interface an on-policy method
implements (rewards, advantages, losses; PPO's in rlhf/trainers/ppo.py, the critic-free
ones in rlhf/trainers/algorithms.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import OnPolicyConfig
from rlhf.rollout import full_sequence

if TYPE_CHECKING:
    from rlhf.trainers.onpolicy import OnPolicyTrainer


@dataclass
class Experience:
    """One rank's share of a rollout batch. Shapes: B rows, P prompt columns, R response columns."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) pad after the first EOS
    action_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    logprobs: torch.Tensor | None  # (B, R) policy at sampling time ("old" log-probs); None until
    # the update fills them when it gives them (OnPolicyTrainer.old_logprobs_from_update)
    ref_logprobs: torch.Tensor | None  # (B, R); None when the algorithm needs no reference
    values: torch.Tensor | None  # (B, R); None without a critic
    scores: torch.Tensor  # (B,) from the reward sources, as they gave them
    prompts: list[str]
    rows: list[dict] | None = None  # the prompt rows (fields, where)
    rewards: torch.Tensor | None = None  # (B, R) per token, or (B,) per response
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    loss_mask: torch.Tensor | None = None  # (B, R) the action tokens the loss counts; None: action_mask
    responses: list[str] | None = None  # the responses' text, when a reward source read it

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        return full_sequence(self.prompt_ids, self.prompt_mask, self.response_ids, self.action_mask)

    def select(self, idx: torch.Tensor) -> "Experience":
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                fields[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                fields[f.name] = [v[i] for i in idx.tolist()]
            else:
                fields[f.name] = v
        return Experience(**fields)


class Algorithm:
    """Rewards, advantages and losses of one on-policy method, from rlhf.losses' pure
    functions. `trainer` gives the collectives (`global_mean_var`) and the stop ids."""

    critic = False
    """Whether a value model is trained beside the policy."""
    rewards_use_logprobs = True
    """Whether compute_rewards/compute_advantages read the old log-probs (a KL in the
    reward); if not, a one-step update may give them instead of a scoring pass."""

    def __init__(self, cfg: OnPolicyConfig, trainer: "OnPolicyTrainer"):
        self.cfg, self.trainer = cfg, trainer
        self.hp = getattr(cfg, cfg.hparams)

    @property
    def uses_reference(self) -> bool:
        return self.hp.kl_coef > 0

    @property
    def kl_coef(self) -> float:
        return self.hp.kl_coef

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        raise NotImplementedError

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def loss_counts(self, mb: Experience) -> dict[str, torch.Tensor]:
        """What the losses divide by, summed over a minibatch's micro-batches and ranks."""
        return {"tokens": (mb.loss_mask if mb.loss_mask is not None else mb.action_mask).sum().float()}

    def policy_loss(self, mb: Experience, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                    counts: dict[str, float], scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy's loss on a micro-batch and its metric sums (divided by the
        minibatch's action tokens after the sum over micro-batches and ranks). `scale`
        is the accumulation steps x ranks that DeepSpeed divides gradients by."""
        raise NotImplementedError

    def value_loss(self, mb: Experience, values: torch.Tensor, counts: dict[str, float],
                   scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, metrics: dict[str, float]) -> None:
        """After the updates of a step (PPO's KL controller moves here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def metrics(self, exp: Experience) -> dict[str, torch.Tensor]:
        """Extra per-step metric sums over rows (divided by the rows of all ranks)."""
        return {}
