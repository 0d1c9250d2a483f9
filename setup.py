"""Build script. The native extension (csrc/) is added here by the native backend;
until then this installs the pure-Python package."""
from setuptools import find_packages, setup

setup(
    name="td_kernels",
    packages=find_packages(include=["td_kernels", "td_kernels.*"]),
)
