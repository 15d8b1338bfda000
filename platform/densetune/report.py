"""python -m densetune.report SWEEP: a sweep's report from its MLflow record (the results stage's `report`)."""

import sys

from .results.report import main, write_report

__all__ = ["main", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
