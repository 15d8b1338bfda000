"""Benchmark loading, suites, subsampling, the synthetic task, tokenization and batching, on the real LLM-Adapters files."""

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from densetune.config import TrialConfig
from densetune.data.loading import (
    REQUIRED_FIELDS,
    SUITES,
    data_dirs,
    expand_suites,
    load_benchmark,
    subsample,
    synthetic_task,
)
from densetune.data.tokens import collate, tokenize_pairs
from densetune.trial.inputs import eval_sources, training_pairs
from densetune.trial.models import byte_tokenizer
from densetune.data.prompts import prompt
from densetune.data.protocols import training_pair

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"LLM-Adapters data not found at {DATA}")
ALLOWED = (
    "a data set is a .json file, a folder holding {split}.json (on this machine, or in a bucket: s3://, gs://), the "
    "name of such a folder in the data folders, a Hub id owner/name, or 'synthetic'"
)
ROW = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5.", "answer": "5"}
EOS = 2  # byte_tokenizer's "</s>"


def not_found(source, split: str) -> str:
    folders = ", ".join(str(folder) for folder in data_dirs()) or "none found"
    return f"{source}: no such file or folder ({ALLOWED.format(split=split)}; data folders: {folders})"


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


# Loading


@needs_data
@pytest.mark.parametrize("file, name, rows", [
    ("ARC-Easy/train.json", "ARC-Easy", 2251), ("ARC-Easy/test.json", "ARC-Easy", 2376),
    ("ARC-Challenge/train.json", "ARC-Challenge", 1119), ("ARC-Challenge/test.json", "ARC-Challenge", 1172),
    ("boolq/train.json", "boolq", 9427), ("boolq/test.json", "boolq", 3270),
    ("openbookqa/train.json", "openbookqa", 4957), ("piqa/test.json", "piqa", 1838),
    ("social_i_qa/test.json", "social_i_qa", 1954), ("math_data.json", "math_data", 3260),
    ("gsm8k/test.json", "gsm8k", 1319), ("AddSub/test.json", "AddSub", 395), ("SVAMP/test.json", "SVAMP", 1000),
    ("AQuA/test.json", "AQuA", 254),
])
def test_every_real_file_loads_with_the_row_count_of_the_readme(file, name, rows):
    benchmark = load_benchmark(str(DATA / file))
    assert (benchmark.name, len(benchmark.rows)) == (name, rows)
    assert all(set(row) == set(REQUIRED_FIELDS) for row in benchmark.rows)
    assert all(isinstance(value, str) for row in benchmark.rows for value in row.values())


@needs_data
def test_a_real_file_keeps_its_rows_unchanged():
    first = json.loads((DATA / "ARC-Easy" / "train.json").read_text())[0]
    assert load_benchmark(str(DATA / "ARC-Easy" / "train.json")).rows[0] == first


@needs_data
def test_a_folder_loads_the_file_of_the_split():
    benchmark = load_benchmark(str(DATA / "ARC-Easy"), "test")
    assert (benchmark.name, len(benchmark.rows)) == ("ARC-Easy", 2376)
    assert benchmark.rows == load_benchmark(str(DATA / "ARC-Easy" / "test.json")).rows
    assert len(load_benchmark(str(DATA / "ARC-Easy")).rows) == 2251  # split defaults to train


def test_names_come_from_the_folder_for_train_and_test_files_and_from_the_stem_otherwise(tmp_path):
    write_rows(tmp_path / "mybench" / "train.json", [ROW])
    write_rows(tmp_path / "mybench" / "test.json", [ROW])
    write_rows(tmp_path / "mybench" / "extra_rows.json", [ROW])
    assert load_benchmark(str(tmp_path / "mybench" / "train.json")).name == "mybench"
    assert load_benchmark(str(tmp_path / "mybench" / "test.json"), "test").name == "mybench"
    assert load_benchmark(str(tmp_path / "mybench" / "extra_rows.json")).name == "extra_rows"
    assert load_benchmark(str(tmp_path / "mybench"), "test").name == "mybench"
    assert load_benchmark("synthetic").name == "synthetic"


@needs_data
def test_training_pairs_are_the_train_split_in_order_as_the_protocol_words_them():
    rows = load_benchmark(str(DATA / "ARC-Challenge" / "train.json")).rows
    assert training_pairs(load_benchmark(DATA / "ARC-Challenge"), "label") == [label_pair(row) for row in rows]
    text = training_pairs(load_benchmark(DATA / "ARC-Challenge"), "text")
    assert text == [training_pair(row, "answer", "text") for row in rows]
    assert text[0] == (
        "Question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most "
        "heat?\nAnswer:", " dry palms",
    )


@needs_data
def test_a_bare_benchmark_name_is_found_in_the_data_folders(monkeypatch, tmp_path):
    assert load_benchmark("ARC-Easy", "test") == load_benchmark(str(DATA / "ARC-Easy"), "test")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.json").write_text(json.dumps([ROW]))
    monkeypatch.setenv("DENSETUNE_DATA", str(tmp_path))
    assert data_dirs() == [tmp_path, DATA] and load_benchmark("mine").rows == [ROW]


def test_a_text_protocol_row_without_options_names_the_row(tmp_path):
    choice = {**ROW, "instruction": "Pick one: Answer1: a Answer2: b Answer3: c Answer4: d", "answer": "answer1"}
    (tmp_path / "train.json").write_text(json.dumps([choice, {**choice, "instruction": "Pick one."}]))
    with pytest.raises(ValueError) as error:
        training_pairs(load_benchmark(tmp_path / "train.json"), "text")
    assert str(error.value) == f"{tmp_path.name} train row 1: cannot read the options answer1/answer2/answer3/answer4/answer5 from the instruction 'Pick one.'"


def test_a_missing_path_names_the_path_and_what_is_allowed(tmp_path):
    missing = tmp_path / "nowhere" / "train.json"
    with pytest.raises(ValueError) as error:
        load_benchmark(str(missing))
    assert str(error.value) == not_found(missing, "train")


def test_a_word_that_is_no_path_and_no_hub_id_is_refused():
    with pytest.raises(ValueError) as error:
        load_benchmark("no-such-benchmark", "test")
    assert str(error.value) == not_found("no-such-benchmark", "test")


@needs_data
def test_a_folder_without_the_split_is_refused():
    folder = DATA / "piqa"  # only test.json
    with pytest.raises(ValueError) as error:
        load_benchmark(str(folder), "train")
    assert str(error.value) == f"{folder}: no train.json in this folder ({ALLOWED.format(split='train')})"


def test_a_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "rows.csv").write_text("instruction,input,output,answer\n")
    with pytest.raises(ValueError) as error:
        load_benchmark(str(tmp_path / "rows.csv"))
    assert str(error.value) == f"{tmp_path / 'rows.csv'}: not a .json file ({ALLOWED.format(split='train')})"


def test_a_row_without_a_field_names_the_file_the_row_and_the_field(tmp_path):
    rows = [dict(ROW) for _ in range(5)]
    del rows[3]["answer"]
    bad = write_rows(tmp_path / "bad.json", rows)
    with pytest.raises(ValueError) as error:
        load_benchmark(str(bad))
    assert str(error.value) == f"{bad}: row 3 has no field 'answer' (each row needs instruction, input, output, answer)"


def test_a_null_field_counts_as_missing(tmp_path):
    bad = write_rows(tmp_path / "bad.json", [ROW, {**ROW, "input": None}])
    with pytest.raises(ValueError) as error:
        load_benchmark(str(bad))
    assert str(error.value) == f"{bad}: row 1 has no field 'input' (each row needs instruction, input, output, answer)"


def test_a_bad_row_in_a_folder_names_the_file(tmp_path):
    bad = write_rows(tmp_path / "bench" / "test.json", [{k: v for k, v in ROW.items() if k != "output"}])
    with pytest.raises(ValueError) as error:
        load_benchmark(str(tmp_path / "bench"), "test")
    assert str(error.value) == f"{bad}: row 0 has no field 'output' (each row needs instruction, input, output, answer)"


def test_numeric_values_become_strings(tmp_path):
    rows = write_rows(tmp_path / "numbers.json", [{**ROW, "answer": 4.0}, {**ROW, "answer": "7"}])
    assert [row["answer"] for row in load_benchmark(str(rows)).rows] == ["4.0", "7"]


def test_an_empty_file_is_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError) as error:
        load_benchmark(str(empty))
    assert str(error.value) == (
        f"{empty}: the file is empty (expected a JSON list of rows with instruction, input, output, answer)"
    )


@pytest.mark.parametrize("text", ["[]", "{not json"])
def test_a_file_without_rows_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="cannot read a JSON list of rows") as error:
        load_benchmark(str(path))
    assert str(error.value).startswith(f"{path}: ")


# Suites: a name that stands for several benchmarks

COMMONSENSE = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


def benchmark_folders(root: Path, tested: Sequence[str], untested: Sequence[str] = ()) -> Path:
    """LLM-Adapters folders under `root`: `tested` ones hold test.json, `untested` ones train.json alone (as
    openbookqa does in the shared data)."""
    for name in tested:
        write_rows(root / name / "test.json", [{**ROW, "instruction": f"A {name} question."}])
    for name in untested:
        write_rows(root / name / "train.json", [ROW])
    return root


def test_the_commonsense_suite_is_the_papers_eight_benchmarks_in_its_order():
    assert SUITES == {"commonsense": COMMONSENSE}


def test_a_suite_becomes_its_benchmarks_with_a_test_split_in_the_suites_order(tmp_path):
    folder = benchmark_folders(tmp_path, ["ARC-Challenge", "piqa", "winogrande", "boolq"], ["openbookqa"])
    expanded, missing = expand_suites(["commonsense"], folders=[folder])
    assert expanded == ["boolq", "piqa", "winogrande", "ARC-Challenge"]
    assert missing == {"commonsense": ["social_i_qa", "hellaswag", "ARC-Easy", "openbookqa"]}
    # openbookqa's train.json counts for the train split
    assert expand_suites(["commonsense"], "train", [folder]) == (["openbookqa"], {"commonsense": [
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
    ]})


def test_a_complete_suite_reports_nothing_missing(tmp_path):
    folder = benchmark_folders(tmp_path, COMMONSENSE)
    assert expand_suites(["commonsense"], folders=[folder]) == (list(COMMONSENSE), {})


def test_other_sources_stay_as_they_are_in_order_and_each_source_comes_once(tmp_path):
    folder = benchmark_folders(tmp_path, ["piqa", "boolq"])
    sources = ["synthetic", "piqa", "commonsense", "data/math_data.json", "boolq", "owner/name", "commonsense"]
    expanded, missing = expand_suites(sources, folders=[folder])
    assert expanded == ["synthetic", "piqa", "boolq", "data/math_data.json", "owner/name"]
    assert missing == {"commonsense": [name for name in COMMONSENSE if name not in ("piqa", "boolq")]}
    assert expand_suites(["ARC-Easy", "synthetic", "ARC-Easy"], folders=[]) == (["ARC-Easy", "synthetic"], {})


def test_a_suite_of_which_no_benchmark_is_found_names_the_suite_the_benchmarks_and_the_folders(tmp_path):
    folder = benchmark_folders(tmp_path, [], ["openbookqa"])
    looked_for = "boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa"
    with pytest.raises(ValueError) as error:
        expand_suites(["synthetic", "commonsense"], folders=[folder])
    assert str(error.value) == (
        f"commonsense: no benchmark of the suite has test.json (looked for {looked_for}; data folders: {folder})"
    )
    with pytest.raises(ValueError) as error:
        expand_suites(["commonsense"], folders=[])
    assert str(error.value) == (
        f"commonsense: no benchmark of the suite has test.json (looked for {looked_for}; data folders: none found)"
    )


def test_a_benchmark_counts_only_if_the_first_folder_holding_it_has_the_split(monkeypatch, tmp_path):
    # All eight folders in $DENSETUNE_DATA hide the shared ones: load_benchmark("hellaswag", "test") would read this
    # folder's hellaswag, which has no test.json, whatever a later folder holds.
    tested = ["boolq", "social_i_qa", "ARC-Easy"]
    folder = benchmark_folders(tmp_path, tested, [name for name in COMMONSENSE if name not in tested])
    monkeypatch.setenv("DENSETUNE_DATA", str(folder))
    expanded, missing = expand_suites(["commonsense"])
    assert expanded == tested
    assert missing == {"commonsense": ["piqa", "hellaswag", "winogrande", "ARC-Challenge", "openbookqa"]}
    assert [load_benchmark(name, "test").rows[0]["instruction"] for name in expanded] == [
        f"A {name} question." for name in tested
    ]


@needs_data
def test_on_the_shared_data_commonsense_is_the_five_benchmarks_with_a_test_split(monkeypatch):
    monkeypatch.delenv("DENSETUNE_DATA", raising=False)
    assert data_dirs() == [DATA]
    expanded, missing = expand_suites(["commonsense"])
    assert expanded == ["boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge"]
    assert missing == {"commonsense": ["hellaswag", "winogrande", "openbookqa"]}  # openbookqa: train.json alone


def test_eval_sources_expand_a_suite_and_warn_once_about_what_it_lacks(monkeypatch, tmp_path, caplog):
    tested = ["piqa", "ARC-Challenge", "boolq"]
    folder = benchmark_folders(tmp_path, tested, [name for name in COMMONSENSE if name not in tested])
    monkeypatch.setenv("DENSETUNE_DATA", str(folder))
    folders = ", ".join(str(path) for path in data_dirs())
    config = TrialConfig(datasets=["synthetic"], eval_datasets=["commonsense"])
    with caplog.at_level(logging.WARNING, logger="densetune.trial.inputs"):
        # load_data, data_source and the tracked data sets each ask
        assert [eval_sources(config) for _ in range(3)] == [["boolq", "piqa", "ARC-Challenge"]] * 3
    assert [record.getMessage() for record in caplog.records] == [
        f"eval suite commonsense: social_i_qa, hellaswag, winogrande, ARC-Easy, openbookqa have no test split in the "
        f"data folders ({folders}); evaluating the other 3"
    ]


def test_eval_sources_without_a_suite_are_the_sources_named(caplog):
    with caplog.at_level(logging.WARNING, logger="densetune.trial.inputs"):
        assert eval_sources(TrialConfig(datasets=["synthetic", "mine.json"])) == ["synthetic", "mine.json"]
        assert eval_sources(TrialConfig(eval_datasets=["owner/name"])) == ["owner/name"]
    assert not caplog.records


# Subsampling


@needs_data
def test_a_data_fraction_keeps_that_share_of_the_rows_in_their_order():
    arc = load_benchmark(str(DATA / "ARC-Easy")).rows
    rows = subsample(arc, 0.1, seed=0)
    assert len(rows) == 225
    positions = [arc.index(row) for row in rows]
    assert positions == sorted(positions)


@needs_data
def test_the_same_seed_gives_the_same_rows_and_another_seed_other_rows():
    arc = load_benchmark(str(DATA / "ARC-Easy")).rows
    assert subsample(arc, 0.1, seed=3) == subsample(arc, 0.1, seed=3)
    assert subsample(arc, 0.1, seed=3) != subsample(arc, 0.1, seed=4)


def test_the_whole_fraction_returns_every_row_in_a_new_list():
    rows = [{**ROW, "answer": str(i)} for i in range(10)]
    kept = subsample(rows, 1.0, seed=5)
    assert kept == rows and kept is not rows


def test_subsampling_rounds_down():
    rows = [{**ROW, "answer": str(i)} for i in range(10)]
    assert len(subsample(rows, 0.35, seed=0)) == 3


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError) as error:
        subsample([ROW] * 10, fraction, seed=0)
    assert str(error.value) == f"data_fraction must be a number in (0, 1], got {fraction!r}"


def test_a_fraction_that_leaves_no_row_is_refused():
    with pytest.raises(ValueError) as error:
        subsample([ROW] * 100, 0.001, seed=0)
    assert str(error.value) == "data_fraction 0.001 of 100 rows leaves no row: use a larger fraction"


# The synthetic task


def test_the_synthetic_task_is_deterministic_and_seeded():
    assert synthetic_task("train") == synthetic_task("train")
    assert synthetic_task("test", seed=1) == synthetic_task("test", seed=1)
    assert synthetic_task("train", seed=1).rows != synthetic_task("train", seed=2).rows


def test_synthetic_sizes_default_and_override():
    assert len(synthetic_task("train").rows) == 2000
    assert len(synthetic_task("test").rows) == 300
    assert len(synthetic_task("test", n=25).rows) == 25
    assert synthetic_task("test", n=25).rows == synthetic_task("test").rows[:25]


def test_synthetic_train_and_test_share_no_instruction():
    for seed in (0, 1):
        train = {row["instruction"] for row in synthetic_task("train", seed=seed).rows}
        test = {row["instruction"] for row in synthetic_task("test", n=1000, seed=seed).rows}
        assert len(train) == 2000 and len(test) == 1000  # no duplicates inside a split either
        assert not train & test


def test_every_synthetic_row_is_a_valid_four_choice_row_whose_answers_are_listed():
    for row in synthetic_task("train").rows + synthetic_task("test").rows:
        assert set(row) == set(REQUIRED_FIELDS) and row["input"] == ""
        head, choices, tail = row["instruction"].split("\n\n")
        assert head.startswith("Please choose the correct answer to the question: Which ")
        assert tail == "Answer format: answer1/answer2/answer3/answer4"
        assert row["answer"] in {"answer1", "answer2", "answer3", "answer4"}
        assert row["output"] == f"the correct answer is {row['answer']}"
        texts = [part.strip() for part in choices.split("Answer")[1:]]
        assert [text.split(": ")[0] for text in texts] == ["1", "2", "3", "4"]
        answers = [text.split(": ", 1)[1] for text in texts]
        assert len(set(answers)) == 4 and all(answer in row["instruction"] for answer in answers)


def test_the_gold_answer_of_every_synthetic_row_is_right():
    for row in synthetic_task("train").rows:
        head, choices, _ = row["instruction"].split("\n\n")
        answers = [text.strip().split(": ", 1)[1] for text in choices.split("Answer")[1:]]
        gold = answers[int(row["answer"][-1]) - 1]
        if "largest" in head:
            assert int(gold) == max(map(int, answers))
        elif "smallest" in head:
            assert int(gold) == min(map(int, answers))
        else:
            assert not any(answer.isdigit() for answer in answers)


def test_synthetic_gold_positions_are_balanced():
    counts = Counter(row["answer"] for row in synthetic_task("train").rows)
    assert set(counts) == {"answer1", "answer2", "answer3", "answer4"}
    assert all(0.15 * 2000 <= count <= 0.35 * 2000 for count in counts.values())


def test_the_synthetic_task_has_only_train_and_test():
    with pytest.raises(ValueError) as error:
        synthetic_task("validation")
    assert str(error.value) == "synthetic split 'validation' does not exist: use 'train' or 'test'"
    with pytest.raises(ValueError) as error:
        load_benchmark("synthetic", "validation")
    assert str(error.value) == "synthetic split 'validation' does not exist: use 'train' or 'test'"


def test_synthetic_is_the_source_named_synthetic():
    assert load_benchmark("synthetic", "test") == synthetic_task("test")
    assert training_pairs(load_benchmark("synthetic"), "label") == [label_pair(row) for row in synthetic_task("train").rows]


# Tokenization and batching (byte_tokenizer: one token per UTF-8 byte, no BOS)


def label_pair(row: dict) -> tuple[str, str]:
    return prompt(row["instruction"], row["input"]), row["output"]


def tokenize_rows(rows, tokenizer, cutoff_len, train_on_inputs=True):
    return tokenize_pairs([label_pair(row) for row in rows], tokenizer, cutoff_len, train_on_inputs)


def tokenize(row, tokenizer, cutoff_len, train_on_inputs=True):
    return tokenize_rows([row], tokenizer, cutoff_len, train_on_inputs).example(0)


def test_tokenize_appends_eos_and_labels_everything_by_default():
    tokenizer = byte_tokenizer()
    text = prompt(ROW["instruction"]) + ROW["output"]
    tokens = tokenize(ROW, tokenizer, cutoff_len=1024)
    assert tokens["input_ids"] == tokenizer(text)["input_ids"] + [EOS]
    assert tokens["labels"] == tokens["input_ids"]
    assert tokenizer.decode(tokens["input_ids"]) == text + "</s>"


def test_tokenize_uses_the_input_in_the_prompt():
    row = {**ROW, "input": "Show the sum."}
    tokens = tokenize(row, byte_tokenizer(), cutoff_len=1024)
    assert len(tokens["input_ids"]) == len((prompt(row["instruction"], row["input"]) + row["output"]).encode()) + 1


def test_tokenize_truncates_at_the_cutoff_without_eos():
    tokens = tokenize(ROW, byte_tokenizer(), cutoff_len=50)
    assert len(tokens["input_ids"]) == len(tokens["labels"]) == 50
    assert EOS not in tokens["input_ids"]


def test_a_text_exactly_at_the_cutoff_gets_no_eos():
    length = len((prompt(ROW["instruction"]) + ROW["output"]).encode())
    assert len(tokenize(ROW, byte_tokenizer(), cutoff_len=length)["input_ids"]) == length
    assert tokenize(ROW, byte_tokenizer(), cutoff_len=length + 1)["input_ids"][-1] == EOS


def test_without_training_on_inputs_exactly_the_prompt_is_masked():
    tokenizer = byte_tokenizer()
    tokens = tokenize(ROW, tokenizer, cutoff_len=1024, train_on_inputs=False)
    prompt_length = len(prompt(ROW["instruction"]).encode())
    assert tokens["labels"][:prompt_length] == [-100] * prompt_length
    assert -100 not in tokens["labels"][prompt_length:]
    assert tokens["labels"][prompt_length:] == tokens["input_ids"][prompt_length:]
    assert tokenizer.decode(tokens["labels"][prompt_length:]) == ROW["output"] + "</s>"


def test_a_prompt_longer_than_the_cutoff_is_all_masked():
    tokens = tokenize(ROW, byte_tokenizer(), cutoff_len=40, train_on_inputs=False)
    assert tokens["labels"] == [-100] * 40


def test_many_rows_tokenize_as_each_alone_end_to_end():
    tokenizer = byte_tokenizer()
    rows = [ROW, {**ROW, "output": "5"}, {**ROW, "input": "Show the sum."}]
    together = tokenize_rows(rows, tokenizer, 1024, train_on_inputs=False)
    alone = [tokenize(row, tokenizer, 1024, train_on_inputs=False) for row in rows]
    assert len(together) == 3
    assert [together.example(i) for i in range(3)] == alone
    assert together.lengths.tolist() == [len(example["input_ids"]) for example in alone]
    assert together.offsets.tolist() == [0, *np.cumsum(together.lengths)]
    assert together.input_ids.dtype == together.labels.dtype == np.int32


def test_a_row_is_trainable_while_a_target_token_follows_its_first_token():
    tokenizer = byte_tokenizer()
    prompt_length = len(prompt(ROW["instruction"]).encode())
    # the answer cut off entirely; one answer token left; the whole text as targets (prompt not masked)
    rows = tokenize_rows([ROW] * 2, tokenizer, prompt_length, train_on_inputs=False)
    kept = tokenize_rows([ROW], tokenizer, prompt_length + 1, train_on_inputs=False)
    everything = tokenize_rows([ROW], tokenizer, 40, train_on_inputs=True)
    assert rows.trainable().tolist() == [False, False]
    assert kept.trainable().tolist() == [True] and everything.trainable().tolist() == [True]
    assert tokenize_rows([], tokenizer, 40).trainable().tolist() == []


def test_collate_right_pads_to_the_longest_example():
    tokenizer = byte_tokenizer()
    rows = tokenize_rows([ROW, {**ROW, "output": "5"}], tokenizer, 1024, train_on_inputs=False)
    examples = [rows.example(0), rows.example(1)]
    long, short = (len(example["input_ids"]) for example in examples)
    batch = collate(rows, [0, 1], pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.shape == (2, long) and tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"][0].tolist() == examples[0]["input_ids"]
    assert batch["input_ids"][1].tolist() == examples[1]["input_ids"] + [3] * (long - short)
    assert batch["attention_mask"].tolist() == [[1] * long, [1] * short + [0] * (long - short)]
    assert batch["labels"][1].tolist() == examples[1]["labels"] + [-100] * (long - short)
    assert batch["labels"][0].tolist() == examples[0]["labels"]
    # any rows, in the order asked for
    assert collate(rows, [1], tokenizer.pad_token_id)["input_ids"][0].tolist() == examples[1]["input_ids"]
