"""Patch an extracted ``pb1-detectron2==0.6`` sdist so it installs and runs on a modern stack.

Only for the CI/CPU route documented in ``docs/INSTALL.md``; a CUDA user installs the official
Detectron2 from source instead. Every patch must apply exactly as expected, otherwise this script
fails (a silently skipped patch would only surface later as an obscure import error).

Usage: ``python tools/env/patch_detectron2.py <extracted sdist dir>``
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

OPTIONAL_C_IMPORT = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # built without C++ ops: deformable conv, rotated boxes, fast COCOeval\n"
    "    _C = None\n"
)
C_IMPORT_FILES = [
    "detectron2/layers/deform_conv.py",
    "detectron2/layers/roi_align_rotated.py",
    "detectron2/layers/rotated_boxes.py",
    "detectron2/evaluation/fast_eval_api.py",
]
# numpy >= 1.24 removed these aliases of Python builtins.
NUMPY_ALIASES = {"bool": "bool_", "int": "int64", "float": "float64", "str": "str_", "object": "object_"}
NUMPY_ALIAS_RE = re.compile(r"\bnp\.(bool|int|float|str|object)\b(?!_)")


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"patch_detectron2: expected exactly one {old!r} in {path}")
    path.write_text(text.replace(old, new))


def patch_setup_py(root: Path) -> None:
    setup_py = root / "setup.py"
    # No C++ sources ship in the sdist: build no extension.
    replace_once(setup_py, "    ext_modules=get_extensions(),\n", "    ext_modules=[],\n")
    # The sdist keeps the model-zoo configs inside the package but setup.py only globs a
    # top-level ``configs/`` folder, so they would not be installed.
    replace_once(
        setup_py,
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    )
    # Dependencies are pinned by the environment script instead (black==21.4b2 et al.).
    text = setup_py.read_text()
    text, n = re.subn(r"install_requires=\[.*?\n    \],\n", "install_requires=[],\n", text, flags=re.S)
    if n != 1:
        raise SystemExit("patch_detectron2: install_requires block not found in setup.py")
    setup_py.write_text(text)


def patch_sources(root: Path) -> None:
    for rel in C_IMPORT_FILES:
        replace_once(root / rel, "from detectron2 import _C\n", OPTIONAL_C_IMPORT)
    # Caffe2 left PyTorch long ago; as on Detectron2's main branch, export its API only when
    # caffe2 exists, so detectron2.export (TracingAdapter, used by the FLOP counter and
    # tools/analyze_model.py) imports.
    replace_once(
        root / "detectron2/export/__init__.py",
        "from .api import *\n",
        "try:\n    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401\n"
        "except ImportError:\n    pass\nelse:\n    from .api import *\n",
    )
    replace_once(
        root / "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
    )
    patched = 0
    for path in sorted((root / "detectron2").rglob("*.py")):
        text = path.read_text()
        new = NUMPY_ALIAS_RE.sub(lambda m: "np." + NUMPY_ALIASES[m.group(1)], text)
        if new != text:
            path.write_text(new)
            patched += 1
    if patched == 0:
        raise SystemExit("patch_detectron2: no numpy aliases found; is this the v0.6 sdist?")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = Path(sys.argv[1])
    if not (root / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"patch_detectron2: {root} is not an extracted detectron2 sdist")
    patch_setup_py(root)
    patch_sources(root)
    print(f"patch_detectron2: patched {root}")


if __name__ == "__main__":
    main()
