"""Worker process for math-verify (run as a script by ``_verify_pool``; not imported).

Protocol: one JSON request per line on stdin, ``[gold, prediction]`` (both already wrapped in
``$…$``); one JSON reply per line on the original stdout: ``{"r": bool}`` or, if parse/verify
raised, ``{"e": "<exception>"}`` so the parent can apply the string fallback of algorithm.md §6.2.
The first line written is ``{"ready": true}`` once math-verify has been imported.  The worker
exits when stdin closes.

This process runs math-verify in its MAIN thread, so math-verify's own signal-based timeouts
(the reference values: 5 s per parse, 5 s per comparison) work here; the parent additionally
enforces a hard wall-clock budget by killing the process, which covers work stuck in C code
(huge integer powers) that no signal can interrupt.
"""

import os
import sys

# Run as a script, sys.path[0] is this folder, whose ``math.py`` would shadow the standard
# library module that sympy imports.  Drop it before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import json  # noqa: E402
import logging  # noqa: E402

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5


def _limit_memory() -> None:
    """Caps the address space so a runaway sympy computation fails fast instead of swapping."""
    limit = int(os.environ.get("RLCSD_VERIFY_MEM_BYTES", str(4 << 30)))
    if limit <= 0:
        return
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not available on this platform: budget still holds
        pass


def _check(gold: str, pred: str) -> dict:
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold, fallback_mode="no_fallback", parsing_timeout=PARSE_TIMEOUT_S)
        pred_parsed = parse(pred, fallback_mode="no_fallback", parsing_timeout=PARSE_TIMEOUT_S)
        return {"r": bool(verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S))}
    except Exception as exc:  # noqa: BLE001 - any failure selects the string fallback
        return {"e": type(exc).__name__}


def main() -> None:
    # Keep the protocol channel private: anything sympy/math-verify prints goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _limit_memory()
    import math_verify  # noqa: F401 - import once up front so requests are fast

    def reply(obj: dict) -> None:
        os.write(out_fd, (json.dumps(obj) + "\n").encode())

    reply({"ready": True})
    for line in sys.stdin.buffer:
        try:
            gold, pred = json.loads(line)
            result = _check(str(gold), str(pred))
        except Exception as exc:  # noqa: BLE001 - a bad request must not end the worker
            result = {"e": type(exc).__name__}
        reply(result)


if __name__ == "__main__":
    main()
