"""Before and after, question by question: a base model and the same model with a trained adapter, evaluated on the
same fixed subsets in one run, with the answer distribution, the majority baseline and an exact McNemar test.

    python bench/paired_eval.py --model smollm2-135m --adapter runs/NAME/checkpoint_000240 \
        --eval-datasets ../shared/data/llm-adapters/ARC-Easy,../shared/data/llm-adapters/boolq --eval-limit 300

The subsets are the ones a trial with the same --eval-limit and --seed evaluates on.
"""

import argparse
import collections
from math import comb

from peft import PeftModel

import densemod  # noqa: F401  (registers DenseLoRA with PEFT, so its adapters load)
from densetune.config import TrialConfig
from densetune.evaluate import Prediction, accuracy, evaluate
from densetune.models import load_model, load_tokenizer
from densetune.inputs import eval_benchmark, eval_set


def mcnemar_p(before: list[Prediction], after: list[Prediction]) -> float:
    """Two-sided exact McNemar test on the questions that only one of the two models got right."""
    only_before = sum(b.correct and not a.correct for b, a in zip(before, after))
    only_after = sum(a.correct and not b.correct for b, a in zip(before, after))
    n, k = only_before + only_after, min(only_before, only_after)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def describe(label: str, predictions: list[Prediction]) -> str:
    answers = collections.Counter(str(p.extracted) for p in predictions)
    return f"  {label:6s} accuracy {accuracy(predictions):.3f}  answers {dict(sorted(answers.items()))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True, help="a folder with adapter_model.safetensors (a checkpoint)")
    parser.add_argument("--eval-datasets", required=True, help="comma-separated test sources")
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--eval-mode", default="loglik")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    config = TrialConfig(eval_limit=args.eval_limit, eval_mode=args.eval_mode, seed=args.seed)
    sets = [eval_set(config, *eval_benchmark(source, args.eval_mode)) for source in args.eval_datasets.split(",")]
    tokenizer = load_tokenizer(args.model)
    model = PeftModel.from_pretrained(load_model(args.model), args.adapter)
    for name, rows in sets:
        with model.disable_adapter():
            before = evaluate(model, tokenizer, name, rows, args.eval_mode, progress=True)
        after = evaluate(model, tokenizer, name, rows, args.eval_mode, progress=True)
        gold = collections.Counter(row["answer"] for row in rows)
        print(f"{name}: {len(rows)} questions, majority baseline {max(gold.values()) / len(rows):.3f} "
              f"gold {dict(sorted(gold.items()))}")
        print(describe("before", before))
        print(describe("after", after))
        print(f"  McNemar exact p = {mcnemar_p(before, after):.3g}", flush=True)


if __name__ == "__main__":
    main()
