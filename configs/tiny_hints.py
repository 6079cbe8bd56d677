"""The tiny demo with a base model that reads hints: RLCSD's mechanism at small scale.

Same model, data and RL settings as configs/tiny.py, but the supervised warm start is a
mixture (`warm_start.target = "answer_hints"`, trainer/warm_start.py): next to each puzzle's
answer-only student example it trains on teacher-template examples ("Reference Solution"
contexts rendered with the trainer's own teacher prompt code, algorithm.md §2.1) whose hint is
the correct answer or a wrong one (roles flipped) and whose target is the hint's answer.  The
base then follows a wrong hint onto the wrong roles, so RLCSD's contrast
e_ctr = log p(y|correct) − log mean_k p(y|wrong_k) (algorithm.md §4.8) is large on the role
tokens (knight / knave) and small elsewhere; the tiny config's base ignores the template
(e_ctr ~0.01 nats, docs/tiny_demo.md).

`warm_start.hint_diagnostics` held-out prompts are scored before and after RL and the run
summary reports mean |e_ctr| and |e_c| on role tokens vs the other response tokens
(`rlcsd_jax.analysis.role_tokens`).  Measurements: docs/tiny_demo.md, "A base that reads hints".

    python -m rlcsd_jax.train --config=configs/tiny_hints.py --workdir=/tmp/rlcsd_tiny_hints
"""

import importlib.util
import os


def _tiny():
    """configs/tiny.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
    spec = importlib.util.spec_from_file_location("rlcsd_tiny_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config():
    c = _tiny().get_config()
    c.warm_start.target = "answer_hints"
    c.warm_start.steps = 600
    c.warm_start.hint_diagnostics = 16
    return c
