"""python -m densetune.sweep list | close NAME: the sweeps in a tracking store (read where the results stage reads
the store: densetune.results.store)."""

import sys

from ..results.store import main

sys.exit(main())
