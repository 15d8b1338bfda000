"""Target-module study (the paper's QKV / UD / QKVUD ablation): which projections DenseLoRA should adapt.

    python experiments/module_sweep.py                     # SmolLM2-135M on ARC-Easy; --dry-run: its time here
    python experiments/module_sweep.py --smoke
    python experiments/module_sweep.py --space targets=qkv,qkvo,q+v --space method=denselora,lora

A target set is a name (qkv, ud, qkvud, qkvo, qkvoud, all-linear) or kinds joined by "+" (q+v). Every set is also
run with LoRA, so each row of the table has its baseline next to it. Mixing methods inside one model (LoRA on some
kinds, DenseLoRA on others) is not offered: densemod adapts a model with one method.
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="module_sweep",
    space={"targets": ["qkv", "ud", "qkvud", "all-linear"], "method": ["denselora", "lora"]},
    columns=("trainable_params",),
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
