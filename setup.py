"""Build script: the package layout lives here because `kernels/` is mapped into the package.

`kernels/` sits at the top of the repository (where kernel authors expect it) but is installed as
`uniter_fast.kernels`: a top-level import package named `kernels` would collide with HuggingFace's
kernel hub, which transformers probes for. Packages are listed explicitly because automatic
discovery and `package_dir` do not mix. Use the editable install (`pip install -e .`): a regular
install run from the repository root is shadowed by the local `uniter_fast/` folder, which holds
neither the mapped kernels nor a compiled extension.
"""

from setuptools import setup

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

setup(
    packages=PACKAGES,
    package_dir={"uniter_fast.kernels": "kernels"},
)
