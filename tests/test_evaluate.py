"""LLM-Adapters evaluation: answer extraction, candidate scoring by log-likelihood, batched generation, sharding."""

import os
from types import SimpleNamespace

import pytest
import torch

from densetune.data.answers import FORMATS, LABEL_FORMATS, LOGLIK_PREFIX, answer_format, choices, extract, is_correct
from densetune.trial.evaluate import (
    Prediction, _attention_mask, _candidate_scores, accuracy, evaluate, generate, loglik_pick,
)
from densetune.trial.models import tiny_llama
from densetune.data.prompts import prompt

ARC_INSTRUCTION = (
    "Please choose the correct answer to the question: Which is the most likely effect?\n\n"
    "Answer1: Days get longer. Answer2: Years get longer. Answer3: Days get shorter. Answer4: Nothing.\n\n"
    "Answer format: answer1/answer2/answer3/answer4"
)
BOOLQ_INSTRUCTION = (
    "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false"
)
ANSWERS = ["answer1", "answer2", "answer3", "answer4"]


def test_formats():
    assert LABEL_FORMATS == FORMATS[:5] == ("boolean", "solution", "answer", "ending", "option")


@pytest.mark.parametrize("fmt, text, expected", [
    ("answer", "answer1 is wrong, the correct answer is answer3", "answer3"),
    ("answer", "Answer2 or answer4", "answer2"),
    ("answer", "The correct answer is ANSWER4.", "answer4"),
    ("answer", "the answer is: answer2", "answer2"),
    ("answer", "the answer is answer2. No wait, the answer is answer1", "answer1"),
    ("answer", "I cannot decide.", None),
    ("answer", "answer12 is not a label", None),
    ("boolean", "the correct answer is TRUE", "true"),
    ("boolean", "False; it is not true.", "false"),
    ("boolean", "That is untrue.", None),
    ("solution", "Solution2 works better than solution1", "solution2"),
    ("ending", "the correct answer is ending4", "ending4"),
    ("option", "Option1", "option1"),
])
def test_extract_label(fmt, text, expected):
    assert extract(fmt, text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\nA: 24 * 24 = 576 tiles. The answer is 576.", 576.0),
    ("He pays $1,234.50 in total.", 1234.5),
    ("It drops to -3 degrees", -3.0),
    ("The answer is -7.25.", -7.25),
    ("He was out $90 - $200 = -$110. The answer is -$110.", -110.0),
    ("1,000,000 people", 1000000.0),
    ("5 apples, 3 pears", 3.0),
    ("about .5 liters", 0.5),
    ("somewhere in 10-12", 12.0),
    ("I don't know", None),
])
def test_extract_number(text, expected):
    assert extract("number", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\nRationale: the difference is $1.23. The answer is (D).", "D"),
    ("The answer is c", "C"),
    ("Answer: E", "E"),
    ("(b) is right", "B"),
    ("A train travels 60 km in (B) hours, so the answer is (C).", "C"),
    ("Answer Choices: (A) 1 (B) 2 (E) 5. The answer is B", "B"),
    ("A train travels 60 km.", "A"),
    ("the answer is a train", None),
    ("no idea", None),
])
def test_extract_letter(text, expected):
    assert extract("letter", text) == expected


def test_extract_unknown_format():
    with pytest.raises(ValueError, match="unknown answer format 'choice'"):
        extract("choice", "answer1")


@pytest.mark.parametrize("fmt, predicted, gold, expected", [
    ("number", 576.0, "576.0", True),
    ("number", 576.0005, "576", True),
    ("number", 576.01, "576", False),
    ("number", 1234.5, "1,234.5", True),
    ("number", None, "576.0", False),
    ("letter", "c", "C", True),
    ("letter", "D", "A", False),
    ("letter", None, "A", False),
    ("answer", "Answer3", "answer3", True),
    ("answer", "answer2", "answer3", False),
    ("boolean", None, "true", False),
])
def test_is_correct(fmt, predicted, gold, expected):
    assert is_correct(fmt, predicted, gold) is expected


@pytest.mark.parametrize("name, expected", [
    ("boolq", "boolean"), ("PIQA", "solution"), ("social_i_qa", "answer"), ("siqa", "answer"),
    ("ARC-Challenge", "answer"), ("arc_easy", "answer"), ("openbookqa", "answer"), ("hellaswag", "ending"),
    ("WinoGrande", "option"), ("gsm8k", "number"), ("AddSub", "number"), ("SVAMP", "number"),
    ("MultiArith", "number"), ("SingleEq", "number"), ("mawps", "number"), ("math_data", "number"),
    ("AQuA", "letter"),
])
def test_answer_format_by_name(name, expected):
    # A known name wins over the answers, which need not be given.
    assert answer_format(name, []) == expected


@pytest.mark.parametrize("answers, expected", [
    (["true", "False"], "boolean"),
    (["solution1", "solution2"], "solution"),
    (["answer1", "answer5"], "answer"),
    (["ending3", "ending1"], "ending"),
    (["option2"], "option"),
    (["A", "e"], "letter"),
    (["576.0", "-3", "1,000", ".5"], "number"),
])
def test_answer_format_from_answers(answers, expected):
    assert answer_format("my_benchmark", answers) == expected


@pytest.mark.parametrize("answers", [["maybe", "42"], []])
def test_answer_format_unknown(answers):
    expected = r"^cannot tell the answer format of benchmark 'mystery'.*boolean, solution"
    with pytest.raises(ValueError, match=expected) as info:
        answer_format("mystery", answers)
    assert "\n" not in str(info.value)
    if answers:
        assert "'maybe'" in str(info.value)


def test_choices_from_the_instruction():
    assert choices("answer", ARC_INSTRUCTION) == ANSWERS
    assert choices("boolean", BOOLQ_INSTRUCTION) == ["true", "false"]
    assert choices("solution", "Solution1: a\n\nSolution2: b\n\nAnswer format: Solution1/Solution2") == [
        "solution1", "solution2"]


def test_choices_defaults():
    assert choices("boolean", "is ice cold?") == ["true", "false"]
    assert choices("solution", "") == ["solution1", "solution2"]
    assert choices("answer", "") == ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert choices("ending", "") == ["ending1", "ending2", "ending3", "ending4"]
    assert choices("option", "") == ["option1", "option2"]


@pytest.mark.parametrize("fmt", ["number", "letter"])
def test_choices_need_a_label_format(fmt):
    with pytest.raises(ValueError, match=f"format '{fmt}' has no fixed candidate answers"):
        choices(fmt, "What is 2 + 2?")


class Bigram(torch.nn.Module):
    """A real bigram language model: the logits at position t are row input_ids[t] of a fixed table.

    It records the shape of every batch it sees, so a test can tell how many sequences were run.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.shapes = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        self.shapes.append(tuple(input_ids.shape))
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits if isinstance(logits_to_keep, int) else logits[:, logits_to_keep])


def bigram(tokenizer, likely: list[str]) -> Bigram:
    """A bigram model under which each string in `likely` is a very likely sequence of bytes, all else flat."""
    table = torch.zeros(len(tokenizer), len(tokenizer))
    for text in likely:
        ids = tokenizer(text)["input_ids"]
        for previous, following in zip(ids, ids[1:]):
            table[previous, following] = 10.0
    return Bigram(table)


@pytest.mark.parametrize("digit", ["1", "3", "4"])
def test_loglik_single_token_candidates_run_the_prompt_once(tokenizer, digit):
    # answer1..answer4 differ only in their last byte: the shared prefix is run once and its last position read.
    model = bigram(tokenizer, [f"answer{digit}"[-2:]])  # only r -> digit is likely
    assert loglik_pick(model, tokenizer, [prompt(ARC_INSTRUCTION)], [ANSWERS]) == [ANSWERS.index(f"answer{digit}")]
    assert sum(shape[0] for shape in model.shapes) == 1


@pytest.mark.parametrize("likely, picks", [("false", [1, 0]), ("true", [0, 0])])
def test_loglik_multi_token_candidates(tokenizer, likely, picks):
    # true/false (and yes/no) differ from their first byte and in length: still one packed sequence per question.
    model = bigram(tokenizer, [" " + likely, " yes"])
    prompts = [prompt(BOOLQ_INSTRUCTION), prompt("Is it raining?", "Answer yes or no.")]
    assert loglik_pick(model, tokenizer, prompts, [["true", "false"], ["yes", "no"]], batch_size=5) == picks
    assert model.shapes == [(2, 275)]  # both questions (275 and 261 packed tokens) fit in 5 x BATCH_TOKENS
    model.shapes.clear()
    loglik_pick(model, tokenizer, prompts, [["true", "false"], ["yes", "no"]], batch_size=1)
    assert [shape[0] for shape in model.shapes] == [1, 1]  # each question longer than half of 1 x BATCH_TOKENS


def test_loglik_mixes_both_paths_in_one_call(tokenizer):
    model = bigram(tokenizer, ["r3", " false", " yes"])
    prompts = [prompt(BOOLQ_INSTRUCTION), prompt(ARC_INSTRUCTION), prompt("Is it raining?")]
    candidates = [["true", "false"], ANSWERS, ["no", "yes"]]
    for batch_size in (1, 2, 8):
        assert loglik_pick(model, tokenizer, prompts, candidates, batch_size=batch_size) == [1, 2, 1]


def direct_score(model, tokenizer, prompt_text: str, candidates: list[str], candidate: str) -> float:
    """The summed log-prob of `candidate`'s tokens after those all candidates share, from one unbatched pass."""
    shared = len(tokenizer(prompt_text + LOGLIK_PREFIX + os.path.commonprefix(candidates))["input_ids"])
    ids = torch.tensor([tokenizer(prompt_text + LOGLIK_PREFIX + candidate)["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(log_probs[t - 1, ids[0, t]].item() for t in range(shared, ids.shape[1]))


def flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def test_loglik_on_tiny_llama_matches_direct_scores_for_any_batching(llama, tokenizer):
    prompts = [prompt(ARC_INSTRUCTION), prompt(BOOLQ_INSTRUCTION), prompt("Pick one.", "short"), prompt("x")]
    candidates = [ANSWERS, ["true", "false"], ["solution1", "solution2"], ["option1", "option2"]]
    expected = [[direct_score(llama, tokenizer, p, c, one) for one in c] for p, c in zip(prompts, candidates)]
    picks = [max(range(len(row)), key=row.__getitem__) for row in expected]
    questions = [[(p + LOGLIK_PREFIX, one) for one in c] for p, c in zip(prompts, candidates)]
    for batch_size in (1, 3, 16):
        scores = _candidate_scores(llama, tokenizer, questions, batch_size=batch_size)
        assert [len(row) for row in scores] == [len(row) for row in expected]
        assert flat(scores) == pytest.approx(flat(expected), abs=1e-4)
        assert loglik_pick(llama, tokenizer, prompts, candidates, batch_size=batch_size) == picks


def test_packed_scores_under_eager_attention_equal_sdpa(tokenizer):
    # SDPA takes the packed questions' mask as booleans, eager attention as an additive float mask.
    prompts, candidates = [prompt(ARC_INSTRUCTION), prompt("Pick one.", "short")], [ANSWERS, ["yes", "no", "maybe"]]
    questions = [[(p + LOGLIK_PREFIX, one) for one in c] for p, c in zip(prompts, candidates)]
    sdpa, eager = tiny_llama().eval(), tiny_llama().eval()
    eager.set_attn_implementation("eager")
    expected = [[direct_score(sdpa, tokenizer, p, c, one) for one in c] for p, c in zip(prompts, candidates)]
    for model in (sdpa, eager):
        scores = _candidate_scores(model, tokenizer, questions, batch_size=16)
        assert flat(scores) == pytest.approx(flat(expected), abs=1e-4)


def test_attention_that_takes_no_4d_mask_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="attention 'flash_attention_2' does not take; load the model with"):
        _attention_mask(model, torch.zeros((1, 3), dtype=torch.long))


def test_inference_state_is_restored(llama, tokenizer):
    llama.train()
    tokenizer.padding_side = "right"
    generate(llama, tokenizer, [prompt("hi")], max_new_tokens=1)
    assert llama.training and tokenizer.padding_side == "right"
    loglik_pick(llama, tokenizer, [prompt("hi")], [["true", "false"]])
    assert llama.training and tokenizer.padding_side == "right"
    llama.eval()


def sharper_llama() -> torch.nn.Module:
    """tiny_llama with larger random weights: its greedy output depends on the prompt (the stock one's barely does)."""
    model = tiny_llama().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2, generator=generator)
    return model


@pytest.mark.parametrize("make_model", [tiny_llama, sharper_llama])
def test_batched_generation_equals_one_prompt_at_a_time(tokenizer, make_model):
    model = make_model()
    prompts = [
        prompt("hi"), prompt("What is the capital of France? Please answer briefly.", "x" * 30), prompt("ab"),
        prompt(BOOLQ_INSTRUCTION),
    ]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=8)
    alone = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert batched == alone
    assert len(batched) == len(prompts) and all(isinstance(text, str) for text in batched)
    if make_model is sharper_llama:
        assert len(set(batched)) > 1  # outputs differ by prompt, so a mix-up of order would show


def rows_of(answers: list[str], instruction: str) -> list[dict]:
    return [{"instruction": f"{instruction} ({i})", "input": "", "answer": a} for i, a in enumerate(answers)]


def test_evaluate_shards_cover_every_row_once(llama, tokenizer):
    rows = rows_of(["true", "false", "true", "true", "false"], BOOLQ_INSTRUCTION)
    shards = [evaluate(llama, tokenizer, "boolq", rows, mode="loglik", shard=(rank, 2)) for rank in (0, 1)]
    assert [p.index for p in shards[0]] == [0, 2, 4] and [p.index for p in shards[1]] == [1, 3]
    whole = evaluate(llama, tokenizer, "boolq", rows, mode="loglik", batch_size=2)
    assert sorted(shards[0] + shards[1], key=lambda p: p.index) == whole
    for p in whole:
        assert p.benchmark == "boolq" and p.gold == rows[p.index]["answer"]
        assert p.output == p.extracted and p.extracted in ("true", "false")
        assert p.correct == (p.extracted == p.gold)


def test_evaluate_generate_on_a_number_benchmark(tokenizer):
    # A model that answers "7", then "0" after every "7" and "7" after anything else: a large bias on the real model's
    # logits (a forward hook), so what it generates is known without running the code under test.
    model = tiny_llama().eval()
    (seven,), (zero,) = tokenizer.encode("7", add_special_tokens=False), tokenizer.encode("0", add_special_tokens=False)

    def seven_then_zero(module, args, kwargs, output):
        after_seven = kwargs["input_ids"][:, -1] == seven
        output.logits[after_seven, -1, zero] += 1e4
        output.logits[~after_seven, -1, seven] += 1e4
        return output

    model.register_forward_hook(seven_then_zero, with_kwargs=True)
    rows = [{"instruction": "What is 2 + 2?", "input": "", "answer": "4.0"},
            {"instruction": "What is 10 - 3?", "input": "Think step by step.", "answer": "7.0"},
            {"instruction": "What is 7 * 10?", "input": "", "answer": "70"}]
    predictions = evaluate(model, tokenizer, "gsm8k", rows, max_new_tokens=1, batch_size=1)
    assert [(p.index, p.output, p.extracted, p.correct) for p in predictions] == [
        (0, "7", 7.0, False), (1, "7", 7.0, True), (2, "7", 7.0, False),
    ]
    (second,) = evaluate(model, tokenizer, "gsm8k", rows, max_new_tokens=2, batch_size=1, shard=(1, 2))
    assert (second.index, second.output, second.extracted, second.correct) == (1, "70", 70.0, False)


def test_evaluate_rejects_bad_requests(llama, tokenizer):
    rows = [{"instruction": "What is 2 + 2?", "input": "", "answer": "4.0"}]
    with pytest.raises(ValueError, match=r"benchmark 'gsm8k' has 'number' answers.*use mode 'generate'"):
        evaluate(llama, tokenizer, "gsm8k", rows, mode="loglik")
    with pytest.raises(ValueError, match=r"mode must be 'generate' or 'loglik'; got 'sample'"):
        evaluate(llama, tokenizer, "gsm8k", rows, mode="sample")
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        evaluate(llama, tokenizer, "gsm8k", rows, shard=(2, 2))


def test_accuracy():
    def prediction(correct):
        return Prediction("boolq", 0, "true", "true", "true", correct)

    assert accuracy([prediction(True), prediction(False), prediction(True), prediction(True)]) == 0.75
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([])
