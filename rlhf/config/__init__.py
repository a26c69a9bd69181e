"""Typed configs for every stage: YAML in, dotted overrides on top, validated before work.

One dataclass tree per stage (``SFTConfig``, ``RMConfig``, ``PPOConfig``, ``GRPOConfig``,
``RLOOConfig``, ``ReinforceConfig``, ``DPOConfig``) built from shared groups. Help text
lives once, in the docstring under each field.

A config file is either a single stage (its top-level keys are the stage's
fields; a stage's own hyperparameter group such as PPO's ``ppo:`` is no section) or a
multi-stage file with ``sft:``, ``rm:``, ``ppo:``, ``grpo:``, ... and ``dpo:`` sections:
top-level keys outside those sections are shared defaults for every stage,
``output_dir`` at the top is the root and each stage writes to
``<root>/<stage>`` unless its section says otherwise, and string values may
name ``${output_dir}`` (the root). Overrides (``optim.lr=1e-5``) are relative
to the stage's section. Every error names the key and where its value came
from (``configs/x.yaml:12`` or the command line).
"""

from rlhf.config.groups import (CheckpointConfig, DataConfig, DeepSpeedConfig, LoggingConfig, LoraConfig,
                                ModelConfig, OptimConfig, SourceConfig, TokenizerConfig, TrainConfig)
from rlhf.config.loading import (STAGES, ConfigError, Validator, dump, exact_div, from_dict, is_multi_stage,
                                 load_yaml, parse_override, resolve_stage_dict, set_dotted, to_dict)
from rlhf.config.stages import (BaseStageConfig, PPOConfig, PPOHParams, PtxConfig, RewardOptions, RMConfig,
                                RoleConfig, RolloutConfig, SFTConfig, VLLMConfig, check_batch_sizes, load_stage_config,
                                validate)
from rlhf.config.stages import DPOConfig, DPOHParams, EvalSamplingConfig
from rlhf.config.stages import (GRPOConfig, GroupHParams, OnPolicyConfig, PolicyGradientHParams, ReinforceConfig,
                                ReinforceHParams, RewardConfig, RLOOConfig)

__all__ = [
    "BaseStageConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "OptimConfig", "PPOConfig", "PPOHParams", "PtxConfig", "RMConfig",
    "RewardOptions", "RoleConfig", "RolloutConfig", "SFTConfig", "STAGES", "SourceConfig", "TokenizerConfig",
    "TrainConfig", "Validator", "VLLMConfig", "check_batch_sizes", "dump", "exact_div", "from_dict", "is_multi_stage",
    "load_stage_config", "load_yaml", "parse_override", "resolve_stage_dict", "set_dotted", "to_dict", "validate",
]
__all__ += ["DPOConfig", "DPOHParams", "EvalSamplingConfig"]
__all__ += ["GRPOConfig", "GroupHParams", "OnPolicyConfig", "PolicyGradientHParams", "ReinforceConfig",
            "ReinforceHParams", "RewardConfig", "RLOOConfig"]
