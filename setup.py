"""Build the Cython kernels in mooncake/_core/.

Every ``mooncake/_core/*.pyx`` is its own extension module, built everywhere.  The ``verbs*``
modules use mooncake's own libibverbs declarations (``mooncake/_core/mc_ibv.h``), never
rdma-core's headers, and link no ``-libverbs``: they open ``libibverbs.so.1`` at import (``-ldl``),
so one build runs the ``rdma`` transport wherever the runtime library and a device exist.
Switches (environment): ``MOONCAKE_CFLAGS`` (default ``-O2``),
``MOONCAKE_DEBUG=1`` (``-O0 -g``), ``MOONCAKE_EXT=a,b`` builds only the named modules.
"""

import os
from glob import glob
from pathlib import Path

from setuptools import Extension, setup

CORE = Path("mooncake/_core")


def _extensions() -> list:
    only = {s for s in os.environ.get("MOONCAKE_EXT", "").split(",") if s}
    debug = os.environ.get("MOONCAKE_DEBUG") == "1"
    cflags = ["-O0", "-g"] if debug else os.environ.get("MOONCAKE_CFLAGS", "-O2").split()
    cflags += ["-std=gnu11", "-Wno-unused-function"]
    exts = []
    for pyx in sorted(glob(str(CORE / "*.pyx"))):
        name = Path(pyx).stem
        if only and name not in only:
            continue
        libs = ["pthread"]
        if name.startswith("verbs"):
            libs.append("dl")  # dlopen/dlvsym (part of libc since glibc 2.34)
        exts.append(
            Extension(
                f"mooncake._core.{name}",
                [pyx],
                include_dirs=[str(CORE)],
                libraries=libs,
                extra_compile_args=cflags,
                define_macros=[("MOONCAKE_DEBUG", "1" if debug else "0")],
            )
        )
    return exts


def _cythonize(exts: list) -> list:
    from Cython.Build import cythonize

    return cythonize(
        exts,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        include_path=[str(CORE)],
        quiet=True,
    )


setup(ext_modules=_cythonize(_extensions()))
