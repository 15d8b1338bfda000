"""Variant ablation (the paper's "freeze" and "only matrix" rows): what the shared, trained W_e / W_d and the GELUs
contribute.

    python experiments/variant_ablation.py                 # SmolLM2-135M on ARC-Easy; --dry-run: its time here
    python experiments/variant_ablation.py --smoke

denselora: W_e, W_d (shared per module kind) and each layer's M train, GELU on both sides of M.
freeze: W_e and W_d stay at their random initialisation; only the r x r matrices M train.
only_matrix: no GELU, so the update W_d M W_e is linear and can be merged into the frozen weight.
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="variant_ablation",
    space={"variant": ["denselora", "freeze", "only_matrix"]},
    columns=("trainable_params",),
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
