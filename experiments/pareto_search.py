"""Pareto search (the paper's Table 1 question): which adapter gives the most accuracy for the fewest trained
parameters? Optuna searches method, rank and targets for two objectives at once, accuracy up and trainable
parameters down; ASHA stops the trials that trail at their first evaluations. The report draws the front.

    python experiments/pareto_search.py                    # SmolLM2-135M, ARC-Easy, 12 trials, 2 CPU cores: ~35 min
    python experiments/pareto_search.py --smoke
    ray job submit --working-dir . -- python experiments/pareto_search.py --gpus-per-worker 0.25 --num-samples 64 \
        --max-steps 1000

A method named for a DenseLoRA variant (freeze, only_matrix) is DenseLoRA with that variant. Every trial evaluates
every 20 steps on its validation set, so ASHA has an accuracy to compare at its rungs; the test split is
evaluated at the start and the end only, and chooses nothing.
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="pareto_search",
    space={
        "method": ["denselora", "freeze", "only_matrix", "lora", "dora", "vera"],
        "rank": [4, 8, 16, 32, 64],
        "targets": ["q,v", "q,k,v,up,down"],
    },
    trial={"eval_every": 20},
    columns=("trainable_params", "trainable_pct"),
    sweep={
        "search": "optuna", "scheduler": "asha", "num_samples": 12, "metric": "val/accuracy/average,trainable_params",
        "mode": "max,min",
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
