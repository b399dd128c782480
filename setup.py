"""Build script: the package layout, and the C++ extension `uniter_fast._C` built from `csrc/`.

`kernels/` sits at the top of the repository (where kernel authors expect it) but is installed as
`uniter_fast.kernels`: a top-level import package named `kernels` would collide with HuggingFace's
kernel hub, which transformers probes for. Packages are listed explicitly because automatic
discovery and `package_dir` do not mix. Use the editable install (`pip install -e .`): a regular
install run from the repository root is shadowed by the local `uniter_fast/` folder, which holds
neither the mapped kernels nor a compiled extension.

The extension (pybind11 over NumPy, C++17, no torch headers) packs batches and buckets lengths.
It is optional at run time: when it cannot be built (no C++ compiler, no pybind11 headers), the
build prints why in a banner and installs the pure-Python package, whose collate falls back to
NumPy and logs one warning. Set UNITER_FAST_REQUIRE_EXT=1 to make a failed build fatal (CI
does), and `pip install -v -e .` to see the banner (pip hides a successful build's output).
"""

import os
import sys
import traceback
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGES = [
    "uniter_fast",
    "uniter_fast.authors",
    "uniter_fast.convert",
    "uniter_fast.data",
    "uniter_fast.model",
    "uniter_fast.ops",
    "uniter_fast.tasks",
    "uniter_fast.train",
    "uniter_fast.kernels",
]

REQUIRE_EXT = os.environ.get("UNITER_FAST_REQUIRE_EXT", "") == "1"
EXT_NAME = "uniter_fast._C"


def _banner(what: str, detail: str) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\n"
        f"uniter-fast: the C++ extension {EXT_NAME} was NOT built: {what}\n"
        f"{detail.rstrip()}\n\n"
        f"The package installs without it: uniter_fast.data.collate falls back to the NumPy\n"
        f"packer (same batches, up to 4x slower) and logs one warning when first used.\n"
        f"To fix: install a C++17 compiler (Debian/Ubuntu: apt-get install g++; macOS:\n"
        f"xcode-select --install) and pybind11, then rerun `pip install -v -e .`.\n"
        f"Set UNITER_FAST_REQUIRE_EXT=1 to make this failure fatal (CI does).\n"
        f"{bar}\n",
        file=sys.stderr,
        flush=True,
    )


def _ext_modules() -> list:
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError as e:
        if REQUIRE_EXT:
            raise RuntimeError(
                f"UNITER_FAST_REQUIRE_EXT=1 but pybind11 is not importable at build time: {e}"
            ) from e
        _banner("pybind11 is not importable at build time", f"{type(e).__name__}: {e}")
        return []
    # Compile the csrc/ files side by side (UNITER_FAST_BUILD_JOBS caps the jobs; default: all
    # cores).
    ParallelCompile("UNITER_FAST_BUILD_JOBS").install()
    return [
        Pybind11Extension(
            EXT_NAME,
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            depends=sorted(glob("csrc/*.h")),
            cxx_std=17,
            # -O3: the packer's conversion loops vectorise; no -march, so one build runs on any
            # x86-64 (or arm64) machine of the cluster.
            extra_compile_args=["-O3"],
        )
    ]


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed extension build loudly and carries on without it, unless
    UNITER_FAST_REQUIRE_EXT=1."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # a missing compiler surfaces here as a platform error
            self._failed(e)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler errors, missing headers, a killed compiler
            self._failed(e)

    def _failed(self, error: Exception) -> None:
        if REQUIRE_EXT:
            raise error
        _banner(
            f"{type(error).__name__}: {error}",
            "The compiler's own messages are above this banner.\n"
            + "".join(traceback.format_exception_only(type(error), error)),
        )


setup(
    packages=PACKAGES,
    package_dir={"uniter_fast.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
