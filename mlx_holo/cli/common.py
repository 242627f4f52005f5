"""What every command shares: exit codes, error reporting, the progress line, and the recipe's flags.

Exit codes: 0 GO (or success), 1 NO-GO, 2 bad input or usage (a one-line ``error:`` naming the problem and the
fix), 3 internal error (one line plus a hint to report it; the traceback with ``--debug``).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time

EXIT_GO, EXIT_NOGO, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


INPUT_ERRORS = {  # module -> the exception types of it that mean "bad input" (exit 2), each naming the problem
    "mlx_holo.data": ("DataError",), "mlx_holo.evidence": ("EvidenceError",), "mlx_holo.model.files": ("ModelError",),
    "mlx_holo.recipe": ("RecipeError",), "mlx_holo.preflight": ("PreflightError",), "mlx_holo.plan": ("PlanError",),
    "mlx_holo.allocate.bits": ("BudgetError",), "mlx_holo.distributed": ("DistributedError",),
}


def input_errors() -> tuple[type, ...]:
    """The "bad input" exception types of the modules loaded so far (a module never loaded raised nothing; looking
    them up this way keeps the MLX-free commands free of MLX)."""
    found = [FileExistsError]
    for mod, names in INPUT_ERRORS.items():
        if mod in sys.modules:
            found += [getattr(sys.modules[mod], n) for n in names]
    return tuple(found)


def run_guarded(fn, debug: bool = False) -> int:
    """Call fn() -> exit code; bad input -> 2 with its message, anything unexpected -> 3 (traceback with debug).
    SIGTERM (what ``kill`` and ``timeout`` send) is handled like Ctrl-C: the run unwinds and leaves no output."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        return fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # disk full, permissions, a path that is a file: the environment, not a bug
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, a hint, exit 3
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e}\n(rerun with --debug for the traceback and report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


def progress_printer(stream=None):
    """on_progress for the terminal: one updating line per stage on stderr, with elapsed time and an ETA."""
    stream = stream or sys.stderr
    last: dict = {}
    started: dict = {}

    def cb(stage, done, total):
        now = time.perf_counter()
        if done <= 1 or stage not in started:
            started.setdefault(stage, now)
        if done < total and now - last.get(stage, 0) < 0.5:
            return
        last[stage] = now
        width = 30
        fill = int(width * done / max(total, 1))
        el = now - started[stage]
        eta = f", {_hms(el / done * (total - done))} left" if 0 < done < total and el > 0 else ""
        stream.write(f"\r{stage:>10} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}  {_hms(el)} elapsed{eta}   ")
        if done >= total:
            stream.write("\n")
            started.pop(stage, None)
        stream.flush()
    return cb


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_recipe_arguments(ap: argparse.ArgumentParser, defaults=None) -> None:
    """One flag per Recipe field, generated from the fields' metadata, grouped by stage: ``--name-with-dashes``
    (a bool that defaults to True: ``--no-name``). ``defaults``: a Recipe whose values are the flags' defaults
    (e.g. read from ``--recipe``)."""
    from ..recipe import STAGES, Recipe

    defaults = defaults or Recipe()
    groups = {s: ap.add_argument_group(f"recipe: {s}") for s in STAGES}
    for f in dataclasses.fields(Recipe):
        meta, value = f.metadata, getattr(defaults, f.name)
        g, flag = groups[meta["stage"]], "--" + f.name.replace("_", "-")
        if meta["type"] is bool:
            if f.default:
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               default=value, help=meta["help"])
            else:
                g.add_argument(flag, dest=f.name, action="store_true", default=value, help=meta["help"])
            continue
        kind = _ints if meta["type"] == "ints" else meta["type"]
        if meta["zero_none"] and value is None:
            value = 0
        g.add_argument(flag, dest=f.name, type=kind, default=value, choices=meta["choices"], metavar=meta["metavar"],
                       help=f"{meta['help']} (default: {_show(value)})")


def _show(v) -> str:
    if v is None or v == ():
        return "unset"
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def recipe_from_args(args: argparse.Namespace):
    """The parsed flags of ``add_recipe_arguments`` -> a Recipe (not yet validated)."""
    from ..recipe import Recipe

    kw = {}
    for f in dataclasses.fields(Recipe):
        v = getattr(args, f.name)
        kw[f.name] = None if f.metadata["zero_none"] and v == 0 else v
    return Recipe(**kw)
