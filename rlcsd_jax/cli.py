"""Command lines on a private absl FlagValues (`python -m rlcsd_jax.plan`, `.analyze_style`).

A private FlagValues keeps importing such a module (the tests do, beside train.py and
evaluate.py) from colliding with the global --config, and lets a test call `main(argv)`
in-process.
"""

from __future__ import annotations

import logging
import sys


def parse_flags(fv, argv: list[str], doc: str, required: tuple[str, ...]) -> int | None:
    """Parse ``argv`` into ``fv``; returns the exit status ``main`` stops with (0 after printing
    ``doc`` and the flags for -h/--help, 2 on a bad flag or a missing ``required`` one), or None
    when the run goes on (then INFO logging is set up)."""
    from absl import flags

    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(doc + "\nflags:\n" + fv.get_help())
        return 0
    try:
        fv(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(fv[name].value is None or fv[name].value == "" for name in required):
        print(f"error: {' and '.join('--' + n for n in required)} are required (see --help)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return None
