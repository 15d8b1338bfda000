"""Before and after, question by question: a base model and the same model with a trained adapter, evaluated on the
same fixed subsets in one run, with the answer distribution, the majority baseline and an exact McNemar test.

    python bench/paired_eval.py --model smollm2-135m --adapter runs/NAME/checkpoint_000240 \
        --eval-datasets ARC-Easy,boolq --eval-limit 300 --protocol label

The subsets are the ones a trial with the same --eval-limit evaluates on. A sweep's report (densetune.report) makes
the same comparison from the store for every trial; this script does it for any adapter folder.
"""

import argparse
import collections

from peft import PeftModel

import densemod  # noqa: F401  (registers DenseLoRA with PEFT, so its adapters load)
from densetune.config import PROTOCOLS, TrialConfig
from densetune.trial.evaluate import Prediction, accuracy, evaluate
from densetune.trial.inputs import eval_benchmark, eval_set
from densetune.trial.models import load_model, load_tokenizer
from densetune.results.stats import majority_baseline, mcnemar


def describe(label: str, predictions: list[Prediction]) -> str:
    answers = collections.Counter(str(p.extracted) for p in predictions)
    return f"  {label:6s} accuracy {accuracy(predictions):.3f}  answers {dict(sorted(answers.items()))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True, help="a folder with adapter_model.safetensors (a checkpoint)")
    parser.add_argument("--eval-datasets", required=True, help="comma-separated test sources")
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--eval-mode", default="loglik", help="the label protocol's: loglik or generate")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="label", help="the protocol the adapter was trained with")
    args = parser.parse_args()

    config = TrialConfig(eval_limit=args.eval_limit, eval_mode=args.eval_mode, protocol=args.protocol)
    sets = [
        eval_set(config, *eval_benchmark(source, args.eval_mode, args.protocol))
        for source in args.eval_datasets.split(",")
    ]
    tokenizer = load_tokenizer(args.model)
    model = PeftModel.from_pretrained(load_model(args.model), args.adapter)
    for name, rows in sets:
        with model.disable_adapter():
            before = evaluate(model, tokenizer, name, rows, args.eval_mode, progress=True, protocol=args.protocol)
        after = evaluate(model, tokenizer, name, rows, args.eval_mode, progress=True, protocol=args.protocol)
        golds = [row["answer"] for row in rows]
        answer, share = majority_baseline(golds)
        print(f"{name}: {len(rows)} questions, majority baseline {share:.3f} ({answer}), "
              f"gold {dict(sorted(collections.Counter(golds).items()))}")
        print(describe("before", before))
        print(describe("after", after))
        test = mcnemar([p.correct for p in before], [p.correct for p in after])
        print(f"  right only before {test.a_only}, only after {test.b_only}: McNemar exact p = {test.p:.3g}", flush=True)


if __name__ == "__main__":
    main()
