"""`python -m rlcsd_jax.plot`: training curves of one or more runs (see `analysis.plot`)."""

import sys

from rlcsd_jax.analysis.plot import main

if __name__ == "__main__":
    sys.exit(main())
