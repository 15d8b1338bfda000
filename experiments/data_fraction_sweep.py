"""Low-resource study (the paper's training-data ablation): DenseLoRA trained on a fraction of the data.

    python experiments/data_fraction_sweep.py              # SmolLM2-135M on ARC-Easy; --dry-run: its time here
    python experiments/data_fraction_sweep.py --smoke
    python experiments/data_fraction_sweep.py --datasets ../shared/data/llm-adapters/ARC-Easy --space data_fraction=0.1,0.5,1

Each trial trains one epoch over its seeded subset, as the paper does, so a smaller fraction also means fewer
steps; the evaluation set is the same for all.
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="data_fraction_sweep",
    space={"data_fraction": [0.1, 0.2, 0.4], "method": ["denselora", "lora"]},
    trial={"max_steps": None, "epochs": 1},
    columns=("trainable_params", "total_steps"),
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
