"""Score an adapter, or a base model, on any benchmarks, without training.

    python -m densetune.evaluate --sweep rank --best --datasets commonsense --protocol text --eval-limit 500
    python -m densetune.evaluate --adapter runs/t1/checkpoint_000060 --datasets ARC-Challenge --num-workers 0
    python -m densetune.evaluate --model smollm2-135m --datasets ARC-Easy       # the base model alone

The questions, the scoring and the precision are a trial's (the same --eval-limit subset, the same numbers for the same
questions), so an adapter scores here as it did at the end of its trial. An adapter is scored together with its base
model on the same questions: per benchmark the accuracy with its 95% interval, the majority baseline, and an exact
McNemar test of the difference, Holm-adjusted across the table. Settings not given are the trial's (its model,
protocol, eval mode, precision), else the trial command's defaults. --log records the evaluation in the sweep's MLflow
experiment, as a run nested under the trial it evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .config import TrialConfig, add_setting, shown

# The trial command's flags that mean the same here (TrialConfig fields): how and on what a model is scored, and where.
SETTINGS = (
    "model", "datasets", "protocol", "eval_mode", "eval_limit", "eval_batch_size", "max_new_tokens", "dtype",
    "num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker",
)
EVALUATIONS = "evaluations"  # the MLflow experiment of a --log'd evaluation of an adapter from no sweep
TABLE, ANSWERS = "evaluation.csv", "predictions.json"


def parser() -> argparse.ArgumentParser:
    from .results.chosen import source_options

    p = argparse.ArgumentParser(
        prog="python -m densetune.evaluate", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[source_options()],
    )
    defaults = TrialConfig()
    for name in SETTINGS:
        unflagged = shown(name, getattr(defaults, name))
        if name == "datasets":
            unflagged = "the benchmarks the trial evaluated on"
        elif name != "num_workers":
            unflagged = f"the trial's; else {unflagged}"
        add_setting(p, name, unflagged, default=None)
    p.add_argument("--no-base", dest="base", action="store_false",
                   help="score the adapter alone: no base model, no paired test (half the time)")
    p.add_argument("--log", action="store_true", help="record the evaluation as an MLflow run (see above)")
    p.add_argument("--output", help="a folder to write the table (evaluation.csv) and every answer (predictions.json) to")
    return p


def settings(args: argparse.Namespace, trained: Optional[TrialConfig]) -> TrialConfig:
    """What scores the model: the flags given, else the adapter's trial's settings, else the trial command's defaults;
    the benchmarks are the evaluation data (eval_datasets)."""
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    start = trained if trained is not None else TrialConfig()
    if "num_workers" not in given:
        given["num_workers"] = TrialConfig().num_workers  # a trial's worker count says nothing of scoring's
    datasets = given.pop("datasets", None)
    if datasets is None and trained is None:
        raise ValueError("no benchmark given: name them with --datasets (ARC-Easy, commonsense, a file or a folder)")
    config = dataclasses.replace(start, **given)
    return dataclasses.replace(config, eval_datasets=datasets if datasets is not None else config.eval_datasets)


def check(config: TrialConfig) -> None:
    """The settings scoring uses, each checked as the trial command checks it, before any model loads."""
    from densemod.denselora.config import check_choice

    from .config import DTYPES, EVAL_MODES, PROTOCOLS
    from .trial.models import check_model_name
    from .trial.run import check_gpus_per_worker, check_non_negative, check_positive, check_positive_number

    check_model_name(config.model)
    check_choice("protocol", config.protocol, PROTOCOLS)
    check_choice("eval_mode", config.eval_mode, EVAL_MODES)
    check_choice("dtype", config.dtype, DTYPES)
    check_non_negative("num_workers", config.num_workers, "in this process")
    for name in ("eval_batch_size", "max_new_tokens", *(["eval_limit"] if config.eval_limit is not None else [])):
        check_positive(name, getattr(config, name))
    for name in ("cpus_per_worker", "gpus_per_worker"):
        check_positive_number(name, getattr(config, name))
    check_gpus_per_worker(config)


def questions(config: TrialConfig) -> list[tuple[str, list[dict]]]:
    """Each benchmark's questions, as a trial with these settings answers them."""
    from .trial.inputs import eval_benchmark, eval_set, eval_sources

    return [eval_set(config, *eval_benchmark(source, config.eval_mode, config.protocol)) for source in eval_sources(config)]


def log_run(config: TrialConfig, adapter: Any, table: Any, answers: Any, tracking_uri: str) -> str:
    """The evaluation as an MLflow run: in the sweep's experiment, nested under the trial it evaluated (tags
    densetune.role evaluation, densetune.evaluated_run), or in the experiment `evaluations` for an adapter from no
    sweep or the base model; its metrics named as a trial's (accuracy/<benchmark>, the base model's as base/...).
    Returns its run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from .files import EVALUATED_RUN, EVALUATION_ROLE, ROLE, SWEEP
    from .sweep.record import now_ms
    from .trial.evaluate import benchmark_metrics

    client = MlflowClient(tracking_uri)
    tags = {ROLE: EVALUATION_ROLE}
    if adapter is not None and adapter.run is not None:
        experiment_id, name = adapter.run.info.experiment_id, f"evaluate-{adapter.run.info.run_name}"
        tags |= {SWEEP: adapter.sweep, EVALUATED_RUN: adapter.run.info.run_id, MLFLOW_PARENT_RUN_ID: adapter.run.info.run_id}
    else:
        found = client.get_experiment_by_name(EVALUATIONS)
        experiment_id = found.experiment_id if found else client.create_experiment(EVALUATIONS)
        name = f"evaluate-{Path(adapter.folder).name if adapter is not None else config.model}"
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {k: shown(k, getattr(config, k)) for k in (*SETTINGS, "eval_datasets") if k != "datasets"}
    params["adapter"] = adapter.described_as if adapter is not None else "none (the base model)"
    stamp = now_ms()
    metrics = benchmark_metrics(answers.adapted or answers.base)
    if answers.adapted and answers.base:
        metrics |= benchmark_metrics(answers.base, "base/")
        metrics |= {f"mcnemar_p/{r.metric}/{r.benchmark}": r.p for r in table.itertuples()}
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_results(Path(tmp), table, answers):
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def write_results(folder: Path, table: Any, answers: Any) -> list[Path]:
    """The table as CSV and every answer as JSON (model "adapter" or "base"), in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["result"], errors="ignore").to_csv(folder / TABLE, index=False)
    records = [{"model": side, **vars(p)} for side in ("adapted", "base")
               for predictions in getattr(answers, side).values() for p in predictions]
    (folder / ANSWERS).write_text(json.dumps(records, indent=1))
    return [folder / TABLE, folder / ANSWERS]


def main(argv: Optional[list[str]] = None) -> int:
    from .trial.run import as_a_command

    from transformers.utils import logging as transformers_logging

    args = parser().parse_args(argv)
    as_a_command()
    transformers_logging.disable_progress_bar()  # a bar for every model load
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as downloads:
        try:
            return evaluate(args, Path(downloads), started)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2


def evaluate(args: argparse.Namespace, downloads: Path, started: float) -> int:
    from .cluster import check_placeable, own_ray, uses_gpu
    from .results.chosen import chosen_adapter
    from .results.paired import answers_given, printable, scores_table
    from .sweep.record import store_uri
    from .trial.scoring import adapter_files, score

    adapter = chosen_adapter(args, downloads)
    config = settings(args, adapter.config if adapter is not None else None)
    if adapter is not None and args.model is None:
        if adapter.base_model is None:
            raise ValueError(
                f"{adapter.described_as} names no base model (no trial settings beside it, none in its "
                "adapter_config.json): give --model"
            )
        config = dataclasses.replace(config, model=adapter.base_model)
    check(config)
    sets = questions(config)
    files = adapter_files(adapter.folder) if adapter is not None else None
    where = "in this process" if config.num_workers == 0 else f"on {config.num_workers} Ray worker(s)"
    what = adapter.described_as if adapter is not None else "no adapter"
    print(f"evaluate: {config.model} with {what}")
    print(f"  {', '.join(f'{name} ({len(rows)} questions)' for name, rows in sets)}; {config.protocol} protocol"
          f"{' (' + config.eval_mode + ')' if config.protocol == 'label' else ''}, dtype {config.dtype}, {where}"
          f"{'; and the base model on the same questions' if files and args.base else ''}", flush=True)

    def say(line: str) -> None:
        print(f"  {line}", flush=True)

    if config.num_workers == 0:
        answers = score(config, sets, files, base=args.base or files is None, progress=say)
    else:
        with own_ray():
            gpu = uses_gpu(config)
            check_placeable(config, gpu)
            answers = score(config, sets, files, base=args.base or files is None, gpu=gpu, progress=say)
    table = scores_table(answers.adapted or answers.base, answers.base if answers.adapted else {})
    print()
    print(printable(table))
    print()
    print("\n".join(answers_given(answers.adapted or answers.base, answers.base if answers.adapted else {})))
    if args.output:
        write_results(Path(args.output), table, answers)
        print(f"\ntable and answers: {args.output}")
    if args.log:
        uri = adapter.tracking_uri if adapter is not None and adapter.tracking_uri else store_uri(args.tracking_uri, args.storage_path)
        run_id = log_run(config, adapter, table, answers, uri)
        print(f"logged as MLflow run {run_id} in {uri}")
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
