"""rlhf: supervised fine-tuning, reward modelling and PPO on one DeepSpeed backbone.

The package imports light: ``rlhf.config``, ``rlhf.losses``, ``rlhf.data`` and
``rlhf.task`` need no DeepSpeed. Trainers import it when they are built.
"""

__version__ = "0.1.0"
