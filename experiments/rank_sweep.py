"""Rank study (the paper's rank ablation): DenseLoRA's accuracy and trainable parameters as the rank r grows.

    python experiments/rank_sweep.py                       # SmolLM2-135M on ARC-Easy, 2 CPU cores: 7.4 min
    python experiments/rank_sweep.py --smoke               # the same on the tiny random model, ~1 min
    python experiments/rank_sweep.py --dry-run             # the trials, what each reserves, their time here
    ray job submit --working-dir . -- python experiments/rank_sweep.py --gpus-per-worker 0.25 --max-steps 500

Trainable parameters grow as sum_kinds (k + d) * r + L * r^2, so the r^2 term of the per-layer matrices M takes
over at large r (docs/parameter_budget.md).
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(name="rank_sweep", space={"rank": [8, 32, 128]}, columns=("trainable_params", "trainable_pct"))

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
