"""One error surface for every psm command (`python -m psm.<command>`).

A user error (a bad config value or key, a missing or corrupt file, a bad flag,
an unwritable path, a refused permission) is printed as one line on stderr,

    error: <what is wrong, naming the key / file / line>

and the command exits with status 2. A bug (any other exception) keeps
Python's traceback and exit status 1. `--verbose` prints the traceback of a
user error too, for reporting a message that is not clear enough.

What counts as a user error (`is_user_error`):

* `UserError`, raised by psm code for a refused input;
* `ValueError` / `TypeError` raised by psm's own code: psm raises these for bad
  input throughout, with a message that names the key or file. The same types
  raised inside a library (numpy, orbax, json) are not messages written for a
  user: they keep their traceback, so that the missing check gets noticed;
* `OSError` (no such file, permission denied, disk full, ...): the system
  refused a path the user gave.

Commands use `run_main` (argparse) or `run_absl` (absl flags) as their
`__main__`; both accept `--verbose`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = "on a user error, print the traceback too (it is one line without)"
_PSM_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(ValueError):
    """A refused input: printed as one `error: ...` line, exit status 2.

    A ValueError, so that callers of the library functions that raise it catch
    it as they catch psm's other input errors.
    """


def _raised_in_psm(e: BaseException) -> bool:
    """True when the innermost frame of e's traceback is psm code (a deliberate raise)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PSM_DIR + os.sep)


def is_user_error(e: BaseException) -> bool:
    """Whether `e` reports bad input (see the module docstring) rather than a bug."""
    if isinstance(e, UserError):
        return True
    if isinstance(e, OSError):
        return True
    try:
        from absl import app
        if isinstance(e, app.UsageError):
            return True
    except ImportError:  # pragma: no cover - absl is a dependency
        pass
    return isinstance(e, (ValueError, TypeError)) and _raised_in_psm(e)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (a multi-line message's lines joined with '; ')."""
    text = str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        # "[Errno 13] Permission denied: 'x'" -> "x: permission denied"
        text = f"{e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def report(e: BaseException, verbose: bool) -> int:
    """Prints a user error (and with `verbose` its traceback); returns the exit status."""
    if verbose:
        traceback.print_exception(e)
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR


def wants_verbose(argv: Sequence[str]) -> bool:
    return any(a == VERBOSE_FLAG or a.startswith(VERBOSE_FLAG + "=") and
               a.split("=", 1)[1].lower() in ("1", "true", "yes") for a in argv)


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None):
    """Runs an argparse command's `main(argv[1:])` and exits: 0, `main`'s status,
    2 on a user error (one line), or a traceback for a bug. Never returns.

    argparse's own usage errors already exit with status 2 and one line.
    """
    argv = list(sys.argv if argv is None else argv)
    try:
        status = main(argv[1:])
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs
        if not is_user_error(e):
            raise
        sys.exit(report(e, wants_verbose(argv)))
    sys.exit(status or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error on one line (`<prog>: error: ... (see --help)`,
    exit status 2) instead of the whole usage block above it."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------- absl commands


def run_absl(main: Callable[[list[str]], int | None]):
    """`absl.app.run(main)` with psm's error surface. Never returns.

    Flag errors (unknown flag, bad value, a `--config` file that does not exist,
    a misspelt `--config.<key>` override) are one line with exit status 2
    instead of absl's "FATAL Flags parsing error" (status 1) or
    ml_collections' chained tracebacks. Defines the `--verbose` flag.
    """
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)

    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs
            if not is_user_error(e):
                raise
            sys.exit(report(e, bool(flags.FLAGS.verbose)))

    app.run(wrapped, flags_parser=parse_absl_flags)


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every refused flag reported in one line (exit 2)."""
    from absl import flags

    verbose = wants_verbose(argv)
    try:
        missing = _missing_config_file(argv)
        if missing:
            raise UserError(missing)
        return flags.FLAGS(argv)  # --help prints and exits in here
    except flags.Error as e:
        # "flag --x=None: Flag --x must have a value other than None." -> "--x is required"
        text = re.sub(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.",
                      r"--\1 is required", one_line(e))
        sys.exit(report(UserError(f"{text} (see --helpshort)"), verbose))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these from deep inside absl for a `--config.` key
        # that names no field.
        message = unknown_config_key(argv)
        if message is None:  # not a misspelt key: a bug, keep the traceback
            raise
        sys.exit(report(UserError(message).with_traceback(e.__traceback__), verbose))
    except UserError as e:
        sys.exit(report(e, verbose))


def _config_spec(argv) -> str | None:
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _missing_config_file(argv) -> str | None:
    """'--config=<file>: no such file' when the config file (before any ':variant') is absent."""
    spec = _config_spec(argv)
    if not spec:
        return None
    path = spec.split(":", 1)[0]
    if os.path.isfile(path):
        return None
    return f"--config={spec}: {path}: no such file"


def unknown_config_key(argv) -> str | None:
    """'unknown config key a.b; did you mean a.c?' for the first `--config.a.b=`
    override that names no field of the config, or None."""
    from absl import flags

    spec = _config_spec(argv)
    if spec is None or "config" not in flags.FLAGS:
        return None
    try:  # the config file alone, without the overrides that failed
        config = flags.FLAGS["config"].parser.parse(spec)
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, done, parts = config, [], key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                prefix = ".".join(done) + ("." if done else "")
                near = difflib.get_close_matches(part, known, n=1)
                if near and _has_path(node[near[0]], parts[i + 1:]):
                    near = [".".join([near[0]] + parts[i + 1:])]
                hint = (f"; did you mean {prefix}{near[0]}?" if near else
                        f"; keys under {prefix.rstrip('.') or 'the config'}: {sorted(known)}"
                        if known else f"; {prefix.rstrip('.')} has no sub-keys")
                return f"unknown config key {key}{hint}"
            node = node[part]
            done.append(part)
    return None


def _has_path(node, parts) -> bool:
    for part in parts:
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def config_keys_help(config, indent: str = "  ") -> str:
    """Every leaf key of a ConfigDict with its value, one `key = value` per line."""
    lines = []

    def walk(node, prefix):
        for key in sorted(node.keys()):
            value = node[key]
            if hasattr(value, "keys"):
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"{indent}{prefix}{key} = {value!r}")

    walk(config, "")
    return "\n".join(lines)
