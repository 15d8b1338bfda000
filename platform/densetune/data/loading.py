"""Training and evaluation data: LLM-Adapters benchmark files, Hub data sets, and a built-in synthetic task.

Every row has the LLM-Adapters fields {instruction, input, output, answer}; `tokens` tokenizes them.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from datasets import disable_progress_bars, load_dataset
from datasets.exceptions import DatasetGenerationError

from ..storage import is_remote, join, read_text

# Reading a local file takes well under a second; its progress bars would only stand between the user and a message.
disable_progress_bars()

REQUIRED_FIELDS = ("instruction", "input", "output", "answer")
SYNTHETIC_SIZES = {"train": 2000, "test": 300}

_ALLOWED = (
    "a data set is a .json file, a folder holding {split}.json (on this machine, or in a bucket: s3://, gs://), the "
    "name of such a folder in the data folders, a Hub id owner/name, or 'synthetic'"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# A suite name stands for these benchmarks (LLM-Adapters folder names), in the order of the DenseLoRA paper's Table 1,
# whose average is over them.
SUITES: dict[str, tuple[str, ...]] = {
    "commonsense": (
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
    ),
}


@dataclass
class Benchmark:
    name: str
    rows: list[dict]


def load_benchmark(source: str | Path, split: str = "train") -> Benchmark:
    """One data set's rows: 'synthetic', a .json file, a folder holding {split}.json, the name of such a folder in
    the data folders (data_dirs: ARC-Easy, boolq), or a Hub id owner/name.

    A .json file is read whatever `split` says, so a training mixture such as math_data.json loads as "train".
    """
    source = str(source)
    if source == "synthetic":
        return synthetic_task(split)
    allowed = _ALLOWED.format(split=split)
    if is_remote(source):
        return _load_uri(source, split, allowed)
    path = Path(source)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{source}: not a .json file ({allowed})")
        name = path.resolve().parent.name if path.stem in ("train", "test") else path.stem
        return Benchmark(name, _validated(_read_json(path), source))
    if path.is_dir():
        file = path / f"{split}.json"
        if not file.is_file():
            raise ValueError(f"{source}: no {split}.json in this folder ({allowed})")
        return Benchmark(path.resolve().name, _validated(_read_json(file), str(file)))
    # A missing local .json file must not be mistaken for a Hub id such as "ARC-Easy/train.json".
    if _HUB_ID.fullmatch(source) and path.suffix != ".json":
        rows = load_dataset(source, split=split).to_list()
        return Benchmark(source.split("/")[1], _validated(rows, source))
    found = find_in_data_dirs(source)
    if found is not None:
        return load_benchmark(found, split)
    searched = ", ".join(str(folder) for folder in data_dirs()) or "none found"
    raise ValueError(f"{source}: no such file or folder ({allowed}; data folders: {searched})")


def data_dirs() -> list[Path]:
    """Where a bare benchmark name (ARC-Easy, boolq) is looked up: the folders in $DENSETUNE_DATA (separated by
    ':'), then the LLM-Adapters files beside this project's checkout (../shared/data/llm-adapters)."""
    listed = [Path(folder) for folder in os.environ.get("DENSETUNE_DATA", "").split(os.pathsep) if folder]
    beside = Path(__file__).resolve().parents[4] / "shared" / "data" / "llm-adapters"
    return [folder for folder in [*listed, beside] if folder.is_dir()]


def find_in_data_dirs(name: str, folders: Sequence[Path] | None = None) -> Path | None:
    """The first folder called `name` in `folders` (default: data_dirs()), the one load_benchmark(name) reads."""
    if "/" in name or name in (".", ".."):
        return None
    folders = data_dirs() if folders is None else folders
    return next((folder / name for folder in folders if (folder / name).is_dir()), None)


def expand_suites(
    sources: Sequence[str], split: str = "test", folders: Sequence[Path] | None = None,
) -> tuple[list[str], dict[str, list[str]]]:
    """`sources` with each suite name (SUITES) replaced by those of its benchmarks that have {split}.json in the data
    folders (`folders`, default data_dirs()), other sources kept as they are, in order, each once; and, per suite that
    lacks some, its missing benchmarks. A suite of which none is found is a ValueError: it would evaluate on nothing.
    """
    folders = data_dirs() if folders is None else list(folders)
    expanded: list[str] = []
    missing: dict[str, list[str]] = {}
    for source in sources:
        if source not in SUITES:
            expanded.append(source)
            continue
        found = [name for name in SUITES[source] if _has_split(name, split, folders)]
        if not found:
            searched = ", ".join(str(folder) for folder in folders) or "none found"
            raise ValueError(
                f"{source}: no benchmark of the suite has {split}.json (looked for {', '.join(SUITES[source])}; "
                f"data folders: {searched})"
            )
        expanded.extend(found)
        if len(found) < len(SUITES[source]):
            missing[source] = [name for name in SUITES[source] if name not in found]
    return list(dict.fromkeys(expanded)), missing


def _has_split(name: str, split: str, folders: Sequence[Path]) -> bool:
    # The first folder called `name` must hold the split, as load_benchmark reads that one and no other.
    found = find_in_data_dirs(name, folders)
    return found is not None and (found / f"{split}.json").is_file()


def _load_uri(source: str, split: str, allowed: str) -> Benchmark:
    """A .json file, or a folder holding {split}.json, in a bucket (s3://, gs://): read through pyarrow, as the runs
    are written, so that a cluster's driver reads its data where every node can."""
    import pyarrow

    location = PurePosixPath(urllib.parse.urlsplit(source).path)
    file = source if location.suffix == ".json" else join(source, f"{split}.json")
    try:
        rows = json.loads(read_text(file))
    except (OSError, ValueError, pyarrow.ArrowException) as error:  # JSONDecodeError is a ValueError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{file}: cannot read a JSON list of rows ({reason}; {allowed})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{file}: not a JSON list of rows ({allowed})")
    folder = location.parent if location.suffix == ".json" else location
    name = folder.name if location.suffix != ".json" or location.stem in ("train", "test") else location.stem
    return Benchmark(name, _validated(rows, file))


def _read_json(path: Path) -> list[dict]:
    # datasets raises StopIteration, without a message, on an empty file.
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (expected a JSON list of rows with {', '.join(REQUIRED_FIELDS)})")
    try:
        return load_dataset("json", data_files=str(path), split="train").to_list()
    except (ValueError, DatasetGenerationError) as error:
        # datasets' messages ('Instruction "train" corresponds to no data!') never name the file.
        reason = error.__cause__ or error
        raise ValueError(f"{path}: cannot read a JSON list of rows ({reason})") from error


def _validated(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise ValueError(f"{source}: no rows")
    checked = []
    for index, row in enumerate(rows):
        for field in REQUIRED_FIELDS:
            # datasets fills a field that some rows lack with None, so None and absent are the same here.
            if row.get(field) is None:
                raise ValueError(
                    f"{source}: row {index} has no field {field!r} (each row needs {', '.join(REQUIRED_FIELDS)})"
                )
        # Answers such as math_data's are numbers in some files; evaluation compares text.
        checked.append({field: str(row[field]) for field in REQUIRED_FIELDS})
    return checked


def load_training_rows(sources: Sequence[str], data_fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """The "train" rows of every source, concatenated in order (as commonsense_170k mixes its benchmarks), then
    subsampled to `data_fraction`."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("no training data set given: name at least one source")
    rows = [row for source in sources for row in load_benchmark(source, "train").rows]
    return subsample(rows, data_fraction, seed)


def check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be a number in (0, 1], got {fraction!r}")


def subsample(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """int(len(rows) * fraction) rows chosen with `seed`, in their original order."""
    return [rows[index] for index in fraction_indices(len(rows), fraction, seed)]


def fraction_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Which of n rows `subsample` keeps."""
    check_fraction(fraction)
    keep = int(n * fraction)
    if keep == 0:
        raise ValueError(f"data_fraction {fraction} of {n} rows leaves no row: use a larger fraction")
    return sample_indices(n, keep, seed)


def sample_rows(rows: list[dict], count: int, seed: int) -> list[dict]:
    """`count` rows chosen with `seed`, in their original order: the same rows for the same seed."""
    return [rows[index] for index in sample_indices(len(rows), count, seed)]


def sample_indices(n: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n), count))


# Words of one category each: a distractor must never also be a right answer.
_CATEGORIES = {
    "a colour": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey"),
    "an animal": ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "mouse", "bear"),
    "a fruit": ("apple", "banana", "grape", "lemon", "cherry", "peach", "mango", "pear", "plum", "melon"),
    "a vehicle": ("car", "bus", "train", "bicycle", "boat", "truck", "plane", "tractor", "scooter", "ship"),
}
_QUESTION_KINDS = ("largest", "smallest", *_CATEGORIES)
# Test rows are those whose instruction hashes into this bucket, train rows the others: the splits stay disjoint
# whatever sizes are asked for.
_TEST_BUCKETS, _TEST_BUCKET = 10, 0


def synthetic_task(split: str, n: int | None = None, seed: int = 0) -> Benchmark:
    """A seeded, offline four-choice task in the style of the LLM-Adapters ARC rows, easy enough for a small
    pretrained model to learn in a few hundred steps: pick the largest or smallest number, or the word of a category.
    """
    if split not in SYNTHETIC_SIZES:
        raise ValueError(f"synthetic split {split!r} does not exist: use 'train' or 'test'")
    n = SYNTHETIC_SIZES[split] if n is None else n
    if n < 1:
        raise ValueError(f"synthetic task size must be at least 1, got {n}")
    # A string seed is hashed with SHA-512 by random.Random, so the stream is the same in every process.
    rng = random.Random(f"densetune-synthetic/{split}/{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        row = _synthetic_row(rng)
        in_test = zlib.crc32(row["instruction"].encode()) % _TEST_BUCKETS == _TEST_BUCKET
        if in_test == (split == "test") and row["instruction"] not in seen:
            seen.add(row["instruction"])
            rows.append(row)
    return Benchmark("synthetic", rows)


def _synthetic_row(rng: random.Random) -> dict:
    kind = rng.choice(_QUESTION_KINDS)
    if kind in _CATEGORIES:
        question = f"Which word names {kind}?"
        right = rng.choice(_CATEGORIES[kind])
        others = [word for category, words in _CATEGORIES.items() if category != kind for word in words]
        wrong = rng.sample(others, 3)
    else:
        question = f"Which number is the {kind}?"
        numbers = sorted(rng.sample(range(1, 100), 4))
        right = numbers.pop(-1 if kind == "largest" else 0)
        wrong = [str(number) for number in numbers]
        rng.shuffle(wrong)
    gold = rng.randrange(4)
    choices = [*wrong[:gold], str(right), *wrong[gold:]]
    listed = " ".join(f"Answer{position}: {choice}" for position, choice in enumerate(choices, 1))
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
        "Answer format: answer1/answer2/answer3/answer4"
    )
    answer = f"answer{gold + 1}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}
