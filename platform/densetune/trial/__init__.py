"""The trial stage: one fine-tuning run as a Ray Train TorchTrainer. `run` checks the config and drives the trial;
`loop` is the training recipe each worker runs, on one state object (`state`), with its model (`models`, `precision`),
checkpoints, evaluation and adapter snapshots (`increments`).

    from densetune.trial import run_trial
"""

from .run import TrialResult, run_trial

__all__ = ["TrialResult", "run_trial"]
