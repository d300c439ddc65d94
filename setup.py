"""vtp-jax: VTP visual tokenizer pre-training and evaluation in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="vtp-jax",
    version="0.1.0",
    description="Pre-train VTP visual tokenizers (CLIP + DINOv2/iBOT + reconstruction) in JAX, "
    "load released VTP checkpoints, evaluate with a Flax LightningDiT.",
    packages=find_packages(include=["vtp_jax", "vtp_jax.*"]),
    package_data={"vtp_jax.evals": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "einops>=0.8",
        "safetensors>=0.4",
        "array_record>=0.5",
        "msgpack",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "scipy>=1.11",  # FID's matrix square root
        "pillow>=10",
        "ftfy>=6",
        "regex",
        "tqdm",
        "absl-py",
        "diffrax>=0.6",  # the adaptive (dopri5) ODE sampler of vtp_jax.sampling
        "matplotlib",  # the study's figure
        # clu.metric_writers / periodic_actions and tfds import TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
        "tensorflow>=2.16; platform_machine!='x86_64'",
        "tensorboard>=2.16",
    ],
    extras_require={
        "test": ["pytest>=8"],
        # Only to convert torch weight files (LPIPS VGG, Inception) and for parity checks.
        "torch": ["torch"],
    },
)
