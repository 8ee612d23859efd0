"""vlm_jax package metadata. Versions are bounded so a fresh install months from now resolves the same majors."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml_collections>=1.1,<2",
    "absl-py>=2.1,<3",
    "einops>=0.8,<0.9",
    "numpy>=2.0,<3",
    "Pillow>=11,<14",
    "tensorboardX>=2.6,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.9,<4",
    "fsspec>=2024.6",
    "braceexpand>=0.1.7,<0.2",   # shard patterns data-{00000..01023}.tar
    "ftfy>=6.1,<7",              # CLIP BPE text cleaning (parity with open_clip)
    "regex>=2023.0",             # CLIP BPE pre-tokenisation (\p{L}, \p{N})
    "sentencepiece>=0.2,<0.3",
    "tensorflow-datasets>=4.9,<5",  # tfds.data_source (ArrayRecord), read without TensorFlow
]

EXTRAS = {
    "dev": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "portpicker>=1.6", "pycocotools>=2.0.8,<3",
            # executing notebooks/ in tests/test_notebooks.py (`make test-notebooks`)
            "nbclient>=0.10,<1", "nbformat>=5.9,<6", "ipykernel>=6.29,<8"],
    "interop": ["torch==2.14.1", "torchvision==0.29.1", "open-clip-torch>=3,<4", "transformers>=4.45,<6",
                "safetensors>=0.4", "timm>=1.0,<2", "webdataset>=0.2.100,<2", "psutil>=5", "pycocoevalcap==1.2"],
    "gcs": ["gcsfs>=2024.6"],
    "wandb": ["wandb>=0.18,<1"],
}

setup(
    name="vlm_jax",
    version="0.1.0",
    description="Vision-language model pre-training, transfer and distillation in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*"]),
    package_data={"vlm_jax.embedding": ["templates/*.txt", "classnames/*.txt", "descriptions/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vlm-pretrain=vlm_jax.pretrain:main",
            "vlm-evaluate=vlm_jax.evaluate.cli:main",
            "vlm-convert=vlm_jax.convert:main",
            "vlm-transfer=vlm_jax.transfer.__main__:main",
            "vlm-distill=vlm_jax.distill.__main__:main",
            "vlm-make-shards=vlm_jax.data.make_shards:main",
            "vlm-train-tokenizer=vlm_jax.data.train_tokenizer:main",
        ],
    },
)
