#!/usr/bin/env python
"""Check a device bundle before it travels: it fits the carry limit and its wheels install there.

    python tools/gpu/check_bundle.py gpu_bundle                  # 64 MiB limit, this checkout
    python tools/gpu/check_bundle.py gpu_bundle --limit-mib 64 --repo .

Checks, each failing with a message that says what to change:
- size: the bundle plus the working tree that travels with it (tracked and untracked,
  not-ignored files of ``--repo``) fit in ``--limit-mib``;
- wheels (``<bundle>/wheels/*.whl``): one version per distribution, every wheel installable on
  CPython 3.12 manylinux x86_64, and every requirement of every wheel (for Python 3.12 on Linux,
  extras not requested) met by another wheel of the bundle or by the device image
  (``device-image-packages.txt``).
Writes ``<bundle>/SIZE.json`` (the measured sizes) when the size check passes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Dict, List, Set

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
MIB = 2**20
#: The device's interpreter and platform (KINDS.md: Python 3.12 on x86-64 Linux, glibc manylinux).
DEVICE_PYTHON = (3, 12)
DEVICE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "extra": ""}


class BundleError(Exception):
    """A check failed; the message says what to change."""


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def working_tree_bytes(repo: Path, exclude: Path) -> int:
    """Bytes of the files a device call sends: tracked and untracked, not-ignored (minus ``exclude``)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout.decode().split("\0")
    exclude = exclude.resolve()
    total = 0
    for name in set(filter(None, listed)):
        path = repo / name
        if path.is_file() and not path.is_symlink() and exclude not in path.resolve().parents:
            total += path.stat().st_size
    return total


def check_size(bundle: Path, repo: Path, limit_mib: float) -> Dict[str, float]:
    """Sizes in MiB (bundle parts, working tree, total); raises BundleError over ``limit_mib``."""
    parts = {p.name: tree_bytes(p) / MIB if p.is_dir() else p.stat().st_size / MIB for p in sorted(bundle.iterdir())}
    bundle_mib = sum(parts.values())
    tree_mib = working_tree_bytes(repo, bundle) / MIB
    total = bundle_mib + tree_mib
    sizes = {"bundle_mib": round(bundle_mib, 2), "working_tree_mib": round(tree_mib, 2),
             "total_mib": round(total, 2), "limit_mib": limit_mib,
             "parts_mib": {k: round(v, 2) for k, v in parts.items()}}
    if total > limit_mib:
        raise BundleError(
            f"bundle {bundle_mib:.1f} MiB + working tree {tree_mib:.1f} MiB = {total:.1f} MiB is over the "
            f"{limit_mib:g} MiB a device call may carry (parts: {sizes['parts_mib']}); make the data smaller "
            "(make_bundle.sh --short-side / --quality) or drop wheels the run does not need")
    return sizes


def read_list(path: Path) -> Set[str]:
    return {canonicalize_name(line.strip()) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def wheel_requirements(wheel: Path) -> List[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(name).decode("utf-8"))
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


def check_wheels(wheels_dir: Path, image_packages: Set[str]) -> List[str]:
    """Names of the bundled distributions; raises BundleError naming every problem found."""
    supported = set(tags.cpython_tags(DEVICE_PYTHON, abis=[f"cp{DEVICE_PYTHON[0]}{DEVICE_PYTHON[1]}", "abi3", "none"],
                                      platforms=DEVICE_PLATFORMS))
    supported |= set(tags.compatible_tags(DEVICE_PYTHON, f"cp{DEVICE_PYTHON[0]}{DEVICE_PYTHON[1]}", DEVICE_PLATFORMS))
    wheels = sorted(wheels_dir.glob("*.whl"))
    problems: List[str] = []
    names: Dict[str, str] = {}
    for wheel in wheels:
        name, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name in names:
            problems.append(f"two wheels of {name}: {names[name]} and {wheel.name} (keep one)")
        names[name] = wheel.name
        if not set(wheel_tags) & supported:
            problems.append(f"{wheel.name} does not install on CPython 3.12 manylinux x86_64")
    for wheel in wheels:
        for req in wheel_requirements(wheel):
            if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
                continue
            needed = canonicalize_name(req.name)
            if needed not in names and needed not in image_packages:
                problems.append(f"{wheel.name} requires {req}, which is neither bundled nor in the device image")
    if problems:
        raise BundleError("wheels:\n  " + "\n  ".join(problems))
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--limit-mib", type=float, default=64.0)
    parser.add_argument("--repo", type=Path, default=HERE.parents[1], help="checkout that travels with the bundle")
    parser.add_argument("--image-packages", type=Path, default=HERE / "device-image-packages.txt")
    args = parser.parse_args()
    try:
        names = check_wheels(args.bundle / "wheels", read_list(args.image_packages))
        sizes = check_size(args.bundle, args.repo, args.limit_mib)
    except BundleError as err:
        sys.exit(f"check_bundle: {err}")
    (args.bundle / "SIZE.json").write_text(json.dumps(dict(sizes, wheels=names), indent=2) + "\n")
    print(f"check_bundle: {len(names)} wheels ({', '.join(names)}) install together on the device")
    print(f"check_bundle: bundle {sizes['bundle_mib']} MiB {sizes['parts_mib']} + working tree "
          f"{sizes['working_tree_mib']} MiB = {sizes['total_mib']} MiB of {args.limit_mib:g} MiB")


if __name__ == "__main__":
    main()
