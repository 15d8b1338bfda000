"""Method comparison (the paper's main tables): DenseLoRA against the PEFT baselines at the same rank.

    python experiments/method_comparison.py                # SmolLM2-135M on ARC-Easy; --dry-run: its time here
    python experiments/method_comparison.py --smoke
    python experiments/method_comparison.py --space rank=16,32 --gpus-per-worker 0.5

The trainable-parameter column is the paper's point: compare accuracy per trained parameter, not accuracy alone.
AdaLoRA starts at rank 1.5 r and prunes to an average of r (densemod.build_peft_config says how each knob maps).
hybrid is the paper's Table 8: LoRA on q, k, v and DenseLoRA on up, down (--set lora_targets=... moves the line).
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="method_comparison",
    space={"method": ["denselora", "lora", "dora", "vera", "lokr", "adalora", "hybrid"]},
    columns=("trainable_params", "trainable_pct"),
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
