"""Packaging. The native extension (csrc/) is added here by the refresh issue; without it this
is a pure-Python install that never runs nvcc."""

from setuptools import setup

setup(
    packages=["q3r", "q3r.optim", "q3r_kernels"],
    package_dir={"q3r": "python/q3r", "q3r.optim": "python/q3r/optim", "q3r_kernels": "q3r_kernels"},
)
