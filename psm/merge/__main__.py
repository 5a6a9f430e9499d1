"""Command line of the streaming merge: `python -m psm.merge --models=a,b --method=...`.

Merges checkpoints on disk tensor by tensor (`psm.merge.streaming`), so models
larger than memory can be merged:

    python -m psm.merge --models=ft1,ft2,ft3 --base=base --method=select \\
        --resample=3 --seed=0 --out=merged
    python -m psm.merge --models=ft1,ft2 --base=base --method=ties --density=0.2 \\
        --out=merged --dtype=bfloat16 --shard-size=2GB
    python -m psm.merge --models=runs/alpaca --method=average --out=merged   # K replicas

Every flag can also come from an ml_collections config file, `--config=merge.py`
(a Python file whose `get_config()` returns a ConfigDict with the same names,
underscores for dashes, e.g. `config.models = "a,b"`, `config.shard_size =
"2GB"`); flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from psm import cli
from psm.merge import streaming

_DEFAULTS = {"method": None, "models": None, "base": None, "out": None, "seed": 0,
             "format": "safetensors", "dtype": None, "shard_size": "5GB", "overwrite": False,
             "progress": True, "compile_cache": None}
_OPTIONS = ("weights", "probs", "resample", "tolerance", "density", "drop_rate", "scale",
            "rescale", "combine", "normalize", "allow_nonfinite")


def _floats(text: str):
    """'0.5,0.5' -> [0.5, 0.5]; a single number stays a float."""
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas; got {text!r}")
    return values[0] if len(values) == 1 else values


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m psm.merge",
        description="Merge checkpoints larger than memory, tensor by tensor.")
    add = p.add_argument
    add("--config", help="ml_collections config file (.py with get_config()); flags override it")
    add("--models", help="comma-separated inputs: HF folders, orbax checkpoints, psm workdirs")
    add("--base", help="the pre-trained model (needed by task_arithmetic, ties, dare, and "
                       "select with --resample)")
    add("--method", help="average | linear | select | task_arithmetic | ties | dare | "
                         "dare_linear | dare_ties")
    add("--out", help="destination folder (refused if it exists, unless --overwrite)")
    add("--seed", type=int, help="random key seed of select and dare (default 0)")
    add("--format", choices=("safetensors", "orbax"), help="output format (default safetensors)")
    add("--dtype", choices=sorted(streaming.DTYPE_NAMES),
        help="cast every floating input tensor to this dtype (also the output dtype)")
    add("--shard-size", "--shard_size", dest="shard_size",
        help="largest safetensors shard, e.g. 5GB (default), 500MB, or bytes")
    add("--overwrite", nargs="?", const=True, type=_bool, help="replace an existing --out")
    add("--progress", nargs="?", const=True, type=_bool, help="show a progress bar (default on)")
    add("--no-progress", dest="progress", action="store_false", default=None)
    add("--compile-cache", "--compile_cache", dest="compile_cache",
        help="folder of JAX's persistent compilation cache (default $PSM_COMPILE_CACHE, else "
             "~/.cache/psm/jax); empty for none")
    add("--no-compile-cache", "--no_compile_cache", dest="compile_cache", action="store_const",
        const="", help="compile without the persistent cache (nothing is written to it)")
    add("--weights", type=_floats, help="K weights, comma-separated")
    add("--probs", type=_floats, help="select: K probabilities")
    add("--resample", type=int, help="select: extra draws while the candidate is unchanged")
    add("--tolerance", type=float, help="select: |theta - base| <= tolerance counts as unchanged")
    add("--density", type=_floats, help="ties: kept fraction (one or K numbers)")
    add("--drop-rate", "--drop_rate", dest="drop_rate", type=_floats,
        help="dare: drop probability (one or K numbers)")
    add("--scale", type=float, help="task_arithmetic / ties / dare: lambda")
    add("--rescale", choices=("inverse", "l1", "none"), help="dare rescaling")
    add("--combine", choices=("linear", "ties"), help="dare: combine rule")
    add("--normalize", nargs="?", const=True, type=_bool,
        help="ties / dare: divide by the (agreeing) weights")
    add("--allow-nonfinite", "--allow_nonfinite", dest="allow_nonfinite", nargs="?", const=True,
        type=_bool, help="merge NaN/inf inputs instead of refusing them")
    add("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    p.set_defaults(**{k: None for k in list(_DEFAULTS) + list(_OPTIONS)})
    return p


def load_config_file(path: str) -> dict:
    """The settings of an ml_collections config file as a plain dict."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: file not found")
    spec = importlib.util.spec_from_file_location("_psm_merge_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path}: no get_config() function")
    cfg = module.get_config()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = set(_DEFAULTS) | set(_OPTIONS)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    return cfg


def settings(argv=None) -> dict:
    """Flags merged over the config file over the defaults."""
    args = build_parser().parse_args(argv)
    cfg = load_config_file(args.config) if args.config else {}
    out = {}
    for key in list(_DEFAULTS) + list(_OPTIONS):
        flag = getattr(args, key)
        out[key] = flag if flag is not None else cfg.get(key, _DEFAULTS.get(key))
    if isinstance(out["models"], str):
        # 'a, b' (a space after the comma, or a quoted list) names a and b.
        out["models"] = [m.strip() for m in out["models"].split(",") if m.strip()]
    for key in ("base", "out", "method"):
        if isinstance(out[key], str):
            out[key] = out[key].strip()
    for key in ("weights", "probs", "density", "drop_rate"):
        if isinstance(out[key], str):
            out[key] = _floats(out[key])
    for key in ("method", "models", "out"):
        if not out[key]:
            raise ValueError(f"--{key} is required (on the command line or in --config)")
    return out


def run(argv=None) -> dict:
    """Parses `argv` and merges; returns the summary dict of `merge_checkpoints`."""
    s = settings(argv)
    options = {k: s[k] for k in _OPTIONS}
    cache = s["compile_cache"]
    with streaming.compile_cache(streaming.default_compile_cache() if cache is None
                                    else cache):
        return streaming.merge_checkpoints(
            s["models"], s["out"], method=s["method"], base=s["base"], seed=s["seed"],
            options=options, fmt=s["format"], dtype=s["dtype"], shard_size=s["shard_size"],
            overwrite=bool(s["overwrite"]), progress=bool(s["progress"]))


def main(argv=None) -> int:
    """Entry point: exit status 0 on success, 2 on a refused input or option (one
    `error:` line, see `psm.cli`; a bug keeps its traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs
        if not cli.is_user_error(e):
            raise
        return cli.report(e, cli.wants_verbose(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
