"""The paper's question asked again: does DenseLoRA match LoRA, at equal trainable parameters and at equal rank, when
each runs at its own learning rate and trains longer?

    python experiments/tuned_comparison.py                 # SmolLM2-135M: about 5 h on 2 CPU cores without bf16
                                                           # (a tuning trial took 18-20 min there, two at a time)
    python experiments/tuned_comparison.py --smoke         # the same on the tiny random model, ~7 min (7 sweeps)
    python experiments/tuned_comparison.py --dry-run       # the plan and an estimate of its time here
    ray job submit --working-dir . -- python experiments/tuned_comparison.py --gpus-per-worker 0.5 --max-steps 2000

Three configurations: DenseLoRA r = 32, LoRA at the rank whose trainable parameters are closest to DenseLoRA r = 32's
(equal parameters; densemod's exact count on the model's architecture: r = 2 on SmolLM2-135M's q, k, v, up, down),
and LoRA r = 32 (equal rank). Each is tuned over lr 1e-4, 3e-4, 1e-3, 3e-3 on the validation set (one seed,
ASHA stopping the trailing trials after a third of the steps; a value past the grid's edge is tried where a pick
lands on it), then runs at its own lr with three seeds for 180 steps, three times the default study's, with the
validation set evaluated every 60 steps (the learning curves). The test split, the five commonsense benchmarks found
in the data folders (100 questions each), is evaluated before and after training only, and chooses nothing.
"""

import sys

from densetune.config import TrialConfig
from densetune.experiment import Study, closest_rank, main

REFERENCE = {"method": "denselora", "rank": 32}


def configurations(trial: TrialConfig) -> list[dict]:
    """DenseLoRA r = 32, LoRA at the rank of DenseLoRA's parameter count (the paper's claim, so tuned first), and LoRA
    at the same rank."""
    rank = closest_rank(trial, "lora", REFERENCE)
    return [REFERENCE, {"method": "lora", "rank": rank}, {"method": "lora", "rank": 32}]


STUDY = Study(
    name="tuned_comparison",
    space={},
    configurations=configurations,
    trial={
        "max_steps": 180, "warmup_steps": 18, "eval_every": 60, "eval_datasets": ["commonsense"], "eval_limit": 100,
        # two trials at once, one core each: on 2 cores they took a step each in 3.8-4.2 s, where one trial on both
        # cores took 2.6-2.8 s (timed in-process, 2026-12-07)
        "cpus_per_worker": 1.0,
    },
    columns=("trainable_params", "trainable_pct"),
    sweep={"tune": "lr=1e-4,3e-4,1e-3,3e-3", "seeds": 3, "scheduler": "asha", "grace_period": 60},
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
