"""python -m densetune.trial: one trial from the command line (densetune.trial.run.main)."""

import sys

from .run import main

sys.exit(main())
