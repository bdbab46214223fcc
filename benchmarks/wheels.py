"""The optional packages' wheels for an offline machine: download them where pip reaches PyPI, install them there.

    python benchmarks/wheels.py download wheels/                        # cp312, manylinux x86_64 (the GPU image)
    python benchmarks/wheels.py download wheels/ --python 3.11 --platform manylinux_2_28_aarch64
    python benchmarks/wheels.py install wheels/                         # on the offline machine: pip --no-index

`download` fetches exactly `WHEELS` (no dependencies: torch, numpy, pyarrow, pandas, transformers and the rest
come with the image; `torch` must never be replaced) for the given Python and platform, with the platform tags
pip needs to find each of them (bitsandbytes 0.50.2 is tagged `manylinux_2_24` only; pip's `--platform` matches
tags literally, so every manylinux level is passed). `install` installs the same pinned set from the folder with
`pip install --no-index --no-deps --find-links DIR` into the running interpreter. benchmarks/gpu_check.py runs
`install` itself when given `--wheels DIR` (or finds ./wheels).

What each is for: torchao (`bf16_sr_bf16_moments`' AdamW, float8 of `amp_bf16_fp8`; its own gate is
torch >= 2.11), bitsandbytes (8-bit AdamW), torch-optimi (Kahan updates, `bf16_kahan_bf16_moments`), datasets with
dill, multiprocess and xxhash (hub and text corpora; the synthetic caches need none of them; xxhash is a
dependency of datasets that the image lacks).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

WHEELS = {"torchao": "0.18.0", "bitsandbytes": "0.50.2", "torch-optimi": "0.3.3", "datasets": "5.2.0",
          "dill": "0.4.1", "multiprocess": "0.70.19", "xxhash": "3.6.0"}
"""pip name -> version: every optional package a config or a data source needs that the GPU image lacks."""
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014")
"""manylinux levels a glibc >= 2.28 machine accepts, newest first (pip's --platform takes tags literally)."""


def requirements(names: list[str] | None = None) -> list[str]:
    """Pinned requirements of `names` (pip names; default: all of `WHEELS`)."""
    return [f"{name}=={WHEELS[name]}" for name in (names or WHEELS)]


def download_command(folder: Path, python: str, platform: str) -> list[str]:
    """pip download of `WHEELS` for `python` (e.g. 3.12) on `platform` (manylinux_2_28_x86_64, or a level-less
    `linux_x86_64`-style tag, which is expanded to every manylinux level of its architecture)."""
    linux = re.fullmatch(r"(?:manylinux_\d+_\d+|manylinux\d+|linux)_(\w+)", platform)
    tags = [f"{level}_{linux.group(1)}" for level in MANYLINUX] if linux else [platform]
    major, minor = python.split(".")
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder),
            "--python-version", f"{major}{minor}", "--implementation", "cp", "--abi", f"cp{major}{minor}",
            "--abi", "abi3", "--abi", "none", *(a for tag in tags for a in ("--platform", tag)),
            "--platform", "any", *requirements()]


def install_command(folder: Path, names: list[str] | None = None) -> list[str]:
    """pip install of `WHEELS` (or of `names` among them) from `folder` only (no index, no dependencies: the
    image's torch stays)."""
    return [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(folder),
            *requirements(names)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    down = sub.add_parser("download", help="fetch the wheels into FOLDER (needs PyPI)")
    down.add_argument("folder", type=Path)
    down.add_argument("--python", default="3.12", help="target Python version")
    down.add_argument("--platform", default="manylinux_2_28_x86_64",
                      help="target platform tag; manylinux/linux tags expand to every manylinux level of the "
                           "architecture")
    inst = sub.add_parser("install", help="install the wheels from FOLDER (offline)")
    inst.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "download":
        args.folder.mkdir(parents=True, exist_ok=True)
        command = download_command(args.folder, args.python, args.platform)
    else:
        if not args.folder.is_dir():
            parser.error(f"{args.folder} is not a folder")
        command = install_command(args.folder)
    print(" ".join(command), flush=True)
    code = subprocess.call(command)
    if code == 0 and args.command == "download":
        for wheel in sorted(args.folder.glob("*.whl")):
            print(f"{wheel.stat().st_size / 1e6:8.1f} MB  {wheel.name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
