"""The sweep stage: many trials under Ray Tune (`tune`), what a searcher may see (`selection`), progress on the console
(`progress`) and the record the sweep writes to MLflow (`record`).

    from densetune.sweep import SweepConfig, run_sweep
"""

from ..config import SweepConfig
from .tune import SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "run_sweep"]
