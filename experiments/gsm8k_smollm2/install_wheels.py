"""Installs the carried wheels that this python lacks into a target folder, offline.

  python install_wheels.py WHEELS_DIR TARGET_DIR

A wheel is skipped when its distribution is already installed (any version: the
GPU machine's own jax/flax stack must not be shadowed). The rest are installed
with `pip install --no-index --no-deps --target`, or unpacked directly when this
python has no pip (a wheel is a zip of the files to place on sys.path). Run with
TARGET_DIR on PYTHONPATH so that a second call finds what the first installed.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile


def wheel_info(filename: str) -> tuple[str, str, str]:
    """(distribution name, version, python tag) from a wheel's file name (PEP 427)."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"{filename}: not a wheel file name (name-version-python-abi-platform)")
    return parts[0], parts[1], parts[-3]


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(wheels_dir: str, target: str) -> int:
    if not os.path.isdir(wheels_dir):
        print(f"error: wheel folder {wheels_dir} is missing", file=sys.stderr)
        return 2
    wheels = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl"))
    if not wheels:
        print(f"error: no .whl files in {wheels_dir}", file=sys.stderr)
        return 2
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    todo = []
    for f in wheels:
        name, version, tag = wheel_info(f)
        have = installed(name)
        if have is not None:
            print(f"  present  {name} {have}")
            continue
        if re.fullmatch(r"cp\d+", tag) and tag != ours:
            print(f"error: {os.path.join(wheels_dir, f)} is built for {tag}, this python is "
                  f"{ours}; rerun prepare_carry.sh --python-version "
                  f"{sys.version_info.major}.{sys.version_info.minor}", file=sys.stderr)
            return 2
        todo.append(f)
        print(f"  install  {name} {version}")
    if not todo:
        return 0
    os.makedirs(target, exist_ok=True)
    paths = [os.path.join(wheels_dir, f) for f in todo]
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                             capture_output=True).returncode == 0
    if has_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--find-links", wheels_dir, "--target", target, *paths]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            print(f"error: pip install into {target} failed (exit {r.returncode})",
                  file=sys.stderr)
            return 2
    else:
        print("  (no pip: unpacking the wheels)")
        for p in paths:
            with zipfile.ZipFile(p) as z:
                z.extractall(target)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
