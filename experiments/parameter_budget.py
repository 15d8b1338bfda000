"""Study: how many parameters DenseLoRA trains against LoRA, by model and rank (the paper's budget column).

    python experiments/parameter_budget.py
    python experiments/parameter_budget.py --models llama-3-8b --ranks 16,512 --targets q,k,v,o

Each count is measured on the real architecture, built from its published config on the meta device (no weights,
no download), after peft.get_peft_model; a count that disagrees with the formula stops the study.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import densemod


def measure(model_name: str, method: str, r: int, targets: str) -> densemod.ParameterReport:
    # PEFT and torch take seconds to import: only once the flags are read, so that --help answers at once.
    import peft

    import densemod
    from densemod.accounting import meta_model

    config = densemod.build_peft_config(method, r, target_modules=targets)
    # low_cpu_mem_usage puts the adapter on the meta device too: nothing is allocated, however large r is.
    report = densemod.parameter_report(peft.get_peft_model(meta_model(model_name), config, low_cpu_mem_usage=True))
    if report.trainable != report.predicted_trainable:
        raise RuntimeError(f"{model_name} {method} r={r}: measured {report.trainable}, formula {report.predicted_trainable}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated (default: every reference model of densemod.accounting)")
    parser.add_argument("--ranks", default="16,32,64,128,256,512")
    parser.add_argument("--targets", default="q,k,v,up,down")
    args = parser.parse_args()
    from densemod.accounting import REFERENCE_MODELS

    models = args.models.split(",") if args.models else list(REFERENCE_MODELS)

    print(f"targets: {args.targets}\n")
    print("| model | r | DenseLoRA trainable | % of model | LoRA trainable | % of model | LoRA / DenseLoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model_name in models:
        for r in map(int, args.ranks.split(",")):
            dense, lora = (measure(model_name, method, r, args.targets) for method in ("denselora", "lora"))
            print(
                f"| {model_name} | {r} | {dense.trainable:,} | {dense.trainable_pct:.4f} | {lora.trainable:,} | "
                f"{lora.trainable_pct:.4f} | {lora.trainable / dense.trainable:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
