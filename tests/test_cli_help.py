"""Every command-line entry point answers `--help` with a description of its flags: exit 0, or
absl's exit 1 for the two `absl.app` programs (train, evaluate), which is absl's own convention."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, a flag its help must mention)
COMMANDS = (
    ("rlcsd_jax.train", "--workdir"),
    ("rlcsd_jax.evaluate", "--checkpoint"),
    ("rlcsd_jax.convert", "--hf_dir"),
    ("rlcsd_jax.plan", "--topology"),
    ("rlcsd_jax.plot", "--workdir"),
    ("rlcsd_jax.analyze_style", "--out"),
    ("rlcsd_jax.data.prepare", "--out"),
    ("benchmarks.run", "--suite"),
    ("benchmarks.engine", "--help"),
    ("benchmarks.attention", "--help"),
    ("benchmarks.teacher_tokens", "--topology"),
    ("benchmarks.plan_table", "--configs"),
    ("benchmarks.plan_scaling", "--help"),
    ("benchmarks.tiny_hints_experiment", "--methods"),
)

ABSL_APPS = ("rlcsd_jax.train", "rlcsd_jax.evaluate")   # absl's --help exits 1


def test_every_entry_point_prints_its_help():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for module, _ in COMMANDS}
    problems = []
    for module, flag in COMMANDS:
        out, _ = procs[module].communicate(timeout=300)
        expected = 1 if module in ABSL_APPS else 0
        if procs[module].returncode != expected or flag not in out:
            problems.append(f"python -m {module} --help: exit {procs[module].returncode}, "
                            f"{flag!r} {'missing' if flag not in out else 'present'}\n"
                            f"{out[-1500:]}")
    assert not problems, "\n\n".join(problems)
