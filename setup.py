"""Build the Cython kernels in mooncake/_core/.

Every ``mooncake/_core/*.pyx`` is its own extension module.  A module whose name starts with
``verbs`` needs ``infiniband/verbs.h``; without the header it is skipped and the ``rdma`` plugin
reports itself unavailable.  Switches (environment): ``MOONCAKE_CFLAGS`` (default ``-O2``),
``MOONCAKE_DEBUG=1`` (``-O0 -g``), ``MOONCAKE_EXT=a,b`` builds only the named modules.
"""

import os
import sys
from glob import glob
from pathlib import Path

from setuptools import Extension, setup

CORE = Path("mooncake/_core")


def _has_header(name: str) -> bool:
    dirs = ["/usr/include", "/usr/local/include"] + os.environ.get("CPATH", "").split(":")
    return any(Path(d, name).exists() for d in dirs if d)


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
            if not _has_header("infiniband/verbs.h"):
                print(f"mooncake: skipping {name} (infiniband/verbs.h not found)", file=sys.stderr)
                continue
            libs.append("ibverbs")
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
