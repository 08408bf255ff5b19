"""``python -m qeff_graph`` == ``qeff-graph``."""

import sys

from qeff_graph.cli import main

sys.exit(main())
