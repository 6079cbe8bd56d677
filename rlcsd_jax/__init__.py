"""rlcsd_jax: RLCSD and its baselines in JAX/Flax.

Submodules are imported on use (``from rlcsd_jax import models, sampling, losses, rewards``) so
that importing the package stays cheap and a tool that needs only the verifiers does not pay
for JAX compilation set-up.
"""

__version__ = "0.1.0"
