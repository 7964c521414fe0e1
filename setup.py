"""aligner: LLM alignment (SFT, reward models, DPO, PPO) on megatron-core, CPU to cluster."""
from setuptools import find_packages, setup

# Version ranges are the ones exercised by CI (Python 3.11, CPU). megatron-core >= 0.17 needs
# Python >= 3.12; the CPU compatibility layer in aligner/compat is tested against 0.16.x only.
INSTALL_REQUIRES = [
    "torch>=2.6",  # CPU machines: install torch==2.13.0 first (see README) to avoid a CUDA build
    "megatron-core>=0.16.1,<0.17",
    "psutil>=5.9",  # needed by megatron-core's checkpoint writers, not declared by it
    "tqdm>=4.66",  # needed by megatron-core's static inference, not declared by it
    "numpy>=1.26",
    "hydra-core>=1.3.2,<1.4",
    "omegaconf>=2.3,<2.4",
    "pytorch-lightning>=2.4,<2.7",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "flask>=3.0,<4",
    "waitress>=3.0,<4",
    "requests>=2.31",
    "safetensors>=0.4.3",
    "tokenizers>=0.20",
    "transformers>=4.45,<6",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "vaderSentiment==3.3.2"],
    "demo": ["vaderSentiment==3.3.2"],
    "hf": ["gguf>=0.10", "accelerate>=1.0"],
    "bench": ["trl==1.16.0"],
    # GPU-only; cannot be installed on a CPU machine. apex is built from source (see README).
    "gpu": ["transformer-engine[pytorch]>=1.13"],
    "wandb": ["wandb>=0.17"],
}

setup(
    name="aligner",
    version="0.1.0",
    description="LLM alignment toolkit (SFT, RM, DPO, PPO with a remote critic) on megatron-core",
    packages=find_packages(include=["aligner", "aligner.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "aligner-prep-movie-reviews=aligner.data.prep.movie_reviews:main",
            "aligner-train-tokenizer=aligner.data.train_tokenizer:main",
        ]
    },
)
