"""moba-train: Megatron-style continued pretraining with MoBA sparse attention."""
from setuptools import find_packages, setup

setup(
    name="moba-train",
    version="0.1.0",
    description="Continued pretraining of long-context Llama models with MoBA (Mixture of Block Attention)",
    python_requires=">=3.11",
    # The Triton kernels live in kernels/ but install as `moba_train.kernels`: a top-level `kernels`
    # would collide with Hugging Face's hub `kernels` package, which transformers imports when present.
    packages=find_packages(include=["moba_train", "moba_train.*"]) + ["moba_train.kernels"],
    package_dir={"moba_train.kernels": "kernels"},
    # torch is deliberately not pinned: install the build for your machine first (CPU or CUDA).
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16.1,<0.17",
        "pyyaml",
        "pydantic>=2",
        "numpy",
        "psutil",
        "tqdm",
        "safetensors",
        "tokenizers",
        "transformers>=4.45",
        "datasets",
        "wandb",
        "tensorboard",
        "matplotlib",
        "xxhash",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff"],
        "triton": ["triton>=3.2", "liger-kernel>=0.8"],  # the MoBA kernels; Liger's fused dense kernels (CUDA)
        # Optional accelerations; never required, never pinned.
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
    },
)
