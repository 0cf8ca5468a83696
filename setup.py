"""Install the STAR/ADORE scripts and their shared modules.

    pip install torch==2.13.0 -e ".[cpu,test]"     # CPU machine (keeps the CPU build of torch)
    pip install -e ".[gpu]"                          # CUDA machine: faiss-gpu-cu12

Never install both extras: faiss-cpu and faiss-gpu-cu12 ship the same ``faiss/`` folder and
silently overwrite each other.
"""
from setuptools import setup

setup(
    name="star-adore",
    version="0.1.0",
    description="STAR and ADORE: dense-retrieval training with hard negatives (Zhan et al., SIGIR 2021)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    py_modules=[
        # the pipeline's stages, as in the original repository
        "preprocess", "dataset", "model", "retrieve_utils", "msmarco_eval", "cvt_back",
        # user-facing tools
        "results_table", "export_sentence_transformers", "sample_data",
    ],
    packages=["star", "adore", "infra"],
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "safetensors>=0.4",
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.7.4"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "test": ["pytest>=7", "ir-measures>=0.3"],
        "plot": ["matplotlib>=3.5"],
        "download": ["gdown>=5.2"],   # download_data.sh warmup / models / runs (Google Drive)
    },
)
