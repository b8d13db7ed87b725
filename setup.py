"""Build adsparse: the C++ CPU kernels (adsparse._C) plus the Python packages.

Packages: ``adsparse`` (python/adsparse), ``adsparse_kernels`` (the Triton kernels) and
``adsparse.benchmarks`` (the scripts of benchmarks/, so `adsparse bench` works from a wheel).

Build switches are environment variables (read here, at build time):
  ADSPARSE_DEBUG=1     build the extension with -O0 -g instead of -O3.
Install against an installed torch:  pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

debug = os.environ.get("ADSPARSE_DEBUG", "0") == "1"
# No -march=native: the wheel must run on AVX2-only CPUs. AVX-512/AVX2 code paths are
# compiled per function with target attributes and chosen at run time (csrc/cpu_isa.h).
# Sources are C++17; torch 2.13 headers need C++20, which cpp_extension adds itself.
cxx_flags = ["-fopenmp", "-Wno-c++20-extensions"] + (["-O0", "-g"] if debug else ["-O3"])

setup(
    # The benchmark scripts ship inside the package (one copy: the folder benchmarks/ itself is
    # mapped), because the CLI's `adsparse bench` must find them in an installed wheel too.
    packages=[*find_packages("python"), "adsparse_kernels", "adsparse.benchmarks"],
    package_dir={"": "python", "adsparse_kernels": "adsparse_kernels",
                 "adsparse.benchmarks": "benchmarks"},
    ext_modules=[
        CppExtension(
            name="adsparse._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            # Headers as dependencies: a header change rebuilds, and an sdist carries them.
            depends=sorted(glob.glob("csrc/*.h")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
