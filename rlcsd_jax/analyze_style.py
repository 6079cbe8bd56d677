"""`python -m rlcsd_jax.analyze_style`: the style-drift token tables (see `analysis.style_drift`)."""

import sys

from rlcsd_jax.analysis.style_drift import main

if __name__ == "__main__":
    sys.exit(main())
