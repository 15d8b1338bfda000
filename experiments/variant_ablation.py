"""Variant ablation (the paper's "freeze" and "only matrix" rows, and sharing off): what the shared, trained W_e / W_d
and the GELUs contribute.

    python experiments/variant_ablation.py                 # SmolLM2-135M on ARC-Easy; --dry-run: its time here
    python experiments/variant_ablation.py --smoke
    python experiments/variant_ablation.py --space share_scope=kind   # the variants alone, with sharing

denselora: W_e, W_d (shared per module kind) and each layer's M train, GELU on both sides of M.
freeze: W_e and W_d stay at their random initialisation; only the r x r matrices M train.
only_matrix: no GELU, so the update W_d M W_e is linear and can be merged into the frozen weight.
share_scope kind: one W_e, W_d per module kind (the paper's DenseLoRA); layer: every adapted layer has its own, the
ablation without sharing, which trains about L / kinds times as many projection parameters.

Every variant runs with sharing on and off (a grid of six), so the table shows whether sharing matters for each.
"""

import sys

from densetune.experiment import Study, main

STUDY = Study(
    name="variant_ablation",
    space={"variant": ["denselora", "freeze", "only_matrix"], "share_scope": ["kind", "layer"]},
    columns=("trainable_params",),
)

if __name__ == "__main__":
    sys.exit(main(STUDY, __doc__))
