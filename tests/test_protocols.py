"""The text protocol: questions and options read from LLM-Adapters instructions, and each option's text scored by
log-likelihood after the context (acc) and per byte of its text (acc_norm), against scores computed by hand."""

import json
import random

import pytest
import torch

from densetune.data.answers import LOGLIK_PREFIX, choices
from densetune.trial.evaluate import _candidate_scores, accuracy, evaluate, text_picks
from densetune.data.prompts import prompt
from densetune.data.protocols import TextQuestion, text_question, training_pair

ARC = {
    "instruction": (
        "Please choose the correct answer to the question: Which tool measures mass?\n\n"
        "Answer1: a ruler Answer2: a balance Answer3: a thermometer Answer4: a clock\n\n"
        "Answer format: answer1/answer2/answer3/answer4"
    ),
    "input": "", "output": "the correct answer is answer2", "answer": "answer2",
}
PIQA = {
    "instruction": (
        "Please choose the correct solution to the question: How do I dry a shirt?\n\n"
        "Solution1: Hang it in the sun.\n\nSolution2: Put it in the freezer.\n\nAnswer format: solution1/solution2"
    ),
    "input": "", "output": "the correct answer is solution1", "answer": "solution1",
}
BOOLQ = {
    "instruction": (
        "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false"
    ),
    "input": "", "output": "the correct answer is true", "answer": "true",
}

# LLM-Adapters' layouts of WinoGrande (the format after the last option, on the same line) and HellaSwag.
WINOGRANDE = {
    "instruction": (
        "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better "
        "surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah Option2: Maria Answer format: "
        "option1/option2"
    ),
    "input": "", "output": "the correct answer is option1", "answer": "option1",
}
HELLASWAG = {
    "instruction": (
        "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting on a "
        "roof. He\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. Ending3: is "
        "holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\nAnswer format: "
        "ending1/ending2/ending3/ending4"
    ),
    "input": "", "output": "the correct answer is ending4", "answer": "ending4",
}


@pytest.mark.parametrize("row, fmt, expected", [
    (ARC, "answer", TextQuestion(
        ["Question: Which tool measures mass?\nAnswer:"] * 4, [" a ruler", " a balance", " a thermometer", " a clock"],
        1, ["answer1", "answer2", "answer3", "answer4"], ["a ruler", "a balance", "a thermometer", "a clock"],
    )),
    (PIQA, "solution", TextQuestion(
        ["Question: How do I dry a shirt?\nAnswer:"] * 2, [" Hang it in the sun.", " Put it in the freezer."], 0,
        ["solution1", "solution2"], ["Hang it in the sun.", "Put it in the freezer."],
    )),
    (BOOLQ, "boolean", TextQuestion(
        ["Question: is ice cold?\nAnswer:"] * 2, [" yes", " no"], 0, ["true", "false"], ["yes", "no"],
    )),
    # The option in the blank, the rest of the sentence scored after it (lm-evaluation-harness's partial evaluation).
    (WINOGRANDE, "option", TextQuestion(
        ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
        [" always got the harder cases."] * 2, 0, ["option1", "option2"], ["Sarah", "Maria"],
    )),
    # The sentence to complete as the context, each ending after it.
    (HELLASWAG, "ending", TextQuestion(
        ["Roof shingle removal: A man is sitting on a roof. He"] * 4,
        [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.",
         " starts pulling up roofing on a roof."],
        3, ["ending1", "ending2", "ending3", "ending4"],
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
         "starts pulling up roofing on a roof."],
    )),
    # The format after the last option on the same line, in a question layout: the options stop before it.
    ({**ARC, "instruction": "Which tool measures mass?\n\nAnswer1: a ruler Answer2: a balance Answer format: "
                            "answer1/answer2"}, "answer", TextQuestion(
        ["Question: Which tool measures mass?\nAnswer:"] * 2, [" a ruler", " a balance"], 1, ["answer1", "answer2"],
        ["a ruler", "a balance"],
    )),
])
def test_question_options_and_gold_come_from_the_instruction(row, fmt, expected):
    assert text_question(row, fmt) == expected


def test_training_pairs_by_protocol():
    assert training_pair(ARC, "answer", "label") == (prompt(ARC["instruction"]), "the correct answer is answer2")
    assert training_pair(ARC, "answer", "text") == ("Question: Which tool measures mass?\nAnswer:", " a balance")
    # the label protocol needs no format: it trains on the row's own output
    assert training_pair(ARC, None, "label")[1] == ARC["output"]


def test_the_answer_format_is_read_wherever_it_stands():
    assert choices("option", WINOGRANDE["instruction"]) == ["option1", "option2"]
    inline = "Who? Answer1: a Answer2: b Answer3: c Answer format: answer1/answer2/answer3"
    assert choices("answer", inline) == ["answer1", "answer2", "answer3"]  # not the five default labels


def test_training_pairs_of_blanks_and_endings():
    assert training_pair(WINOGRANDE, "option", "text") == (
        "Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases.")
    assert training_pair(HELLASWAG, "ending", "text") == (
        "Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.")


@pytest.mark.parametrize("instruction, message", [
    # a format statement the reader does not know stays in the last option's text
    ("Who? Answer1: Sarah Answer2: Maria Answer format: (answer1 or answer2)", "option answer2's text 'Maria Answer "
     "format: \\(answer1 or answer2\\)' holds 'Answer format'"),
    ("Who? Answer1: Sarah, not answer2 Answer2: Maria", "option answer1's text 'Sarah, not answer2' holds 'answer2'"),
])
def test_an_option_that_holds_a_format_or_a_label_is_an_error_naming_the_row(llama, tokenizer, instruction, message):
    rows = [ARC, {**ARC, "instruction": instruction, "answer": "answer1"}]
    with pytest.raises(ValueError, match=f"^ARC-Easy row 1: {message}: the options were not read apart"):
        evaluate(llama, tokenizer, "ARC-Easy", rows, protocol="text")


def test_blanks_are_scored_by_the_rest_of_the_sentence_after_each_option(llama, tokenizer):
    rows = [WINOGRANDE, {**WINOGRANDE, "answer": "option2"}]
    question = text_question(WINOGRANDE, "option")
    scores = [option_log_likelihood(llama, tokenizer, c, t) for c, t in zip(question.contexts, question.continuations)]
    pick = scores.index(max(scores))
    predictions = evaluate(llama, tokenizer, "winogrande", rows, protocol="text")
    assert [p.output for p in predictions] == [["Sarah", "Maria"][pick]] * 2
    assert [p.correct for p in predictions] == [pick == 0, pick == 1]
    assert [p.correct_norm for p in predictions] == [p.correct for p in predictions]  # one continuation: acc_norm = acc


@pytest.mark.parametrize("row, fmt, message", [
    ({**ARC, "instruction": ARC["instruction"].replace("Answer3: ", "")}, "answer", "cannot read the options answer1/answer2/answer3/answer4 from"),
    ({**ARC, "answer": "answer7"}, "answer", "answer 'answer7' is none of the options answer1/answer2/answer3/answer4"),
    ({**ARC, "answer": "4"}, "number", "protocol 'text' scores the options of multiple-choice questions; 'number'"),
])
def test_unreadable_questions_are_refused_in_one_line(row, fmt, message):
    with pytest.raises(ValueError, match=message):
        text_question(row, fmt)


def option_log_likelihood(model, tokenizer, context: str, option: str) -> float:
    """The summed log-prob of the option's tokens after the context, from one unbatched pass (byte tokens: the
    context's tokens are a prefix of the whole text's)."""
    start = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([tokenizer(context + option)["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(log_probs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def test_text_picks_are_acc_and_acc_norm_of_hand_computed_scores(llama, tokenizer):
    questions = [text_question(ARC, "answer"), text_question(PIQA, "solution"), text_question(BOOLQ, "boolean")]
    expected = []
    for question in questions:
        scores = [
            option_log_likelihood(llama, tokenizer, context, option)
            for context, option in zip(question.contexts, question.continuations)
        ]
        per_character = [score / len(option[1:]) for score, option in zip(scores, question.continuations)]  # no " "
        expected.append((scores.index(max(scores)), per_character.index(max(per_character))))
    pairs = [list(zip(q.contexts, q.continuations)) for q in questions]
    for batch_size in (1, 3, 16):
        assert text_picks(llama, tokenizer, pairs, batch_size) == expected


@pytest.mark.parametrize("options, scores, picks", [
    # acc_norm by the option's own text: -4/2 < -7/4, so " abcd"; by " ab" and " abcd" (-4/3 > -7/5) it was " ab"
    ([" ab", " abcd"], [-4.0, -7.0], (0, 1)),
    # characters, not bytes (lm-evaluation-harness: len() of the choice): -8/4 < -5.5/3; per byte -8/5 > -5.5/3
    ([" café", " tea"], [-8.0, -5.5], (1, 1)),
    ([" no", " yes"], [-3.0, -3.3], (0, 1)),  # -3.0/2 < -3.3/3
])
def test_acc_norm_divides_by_the_length_of_the_option_s_own_text(monkeypatch, options, scores, picks):
    import densetune.trial.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_candidate_scores", lambda *args, **kwargs: [scores])
    assert text_picks(None, None, [[("Question: q\nAnswer:", option) for option in options]]) == [picks]


def test_evaluate_under_the_text_protocol_reports_both_picks(llama, tokenizer):
    rows = [{**ARC, "answer": f"answer{k}"} for k in (2, 4, 1, 3)]  # each option right once: both accuracies 1/4
    predictions = evaluate(llama, tokenizer, "ARC-Easy", rows, mode="generate", protocol="text")
    question = text_question(ARC, "answer")
    ((pick, pick_norm),) = text_picks(llama, tokenizer, [list(zip(question.contexts, question.continuations))])
    labels = ["answer1", "answer2", "answer3", "answer4"]
    for p, row in zip(predictions, rows):
        assert p.extracted == labels[pick] and p.output == question.texts[pick]
        assert p.correct == (labels[pick] == row["answer"]) and p.correct_norm == (labels[pick_norm] == row["answer"])
    assert accuracy(predictions) == accuracy(predictions, norm=True) == 1 / 4
    with pytest.raises(ValueError, match="no length-normalised picks"):
        accuracy(evaluate(llama, tokenizer, "ARC-Easy", rows, mode="loglik"), norm=True)
    with pytest.raises(ValueError, match="protocol must be one of label, text; got 'words'"):
        evaluate(llama, tokenizer, "ARC-Easy", rows, protocol="words")


def one_at_a_time(model, tokenizer, context: str, options: list[str], from_context: bool) -> list[float]:
    """Each option's log-likelihood as the scorer computed it before options were packed: each option its own
    sequence, context included, in one unbatched pass, summed from the first token that the context and every option
    do not all share (from_context), or that the options do not all share."""
    sequences = [tokenizer(context + option)["input_ids"] for option in options]
    shared = [tokenizer(context)["input_ids"], *sequences] if from_context else sequences
    start = next((t for t, column in enumerate(zip(*shared)) if len(set(column)) > 1), min(map(len, shared)))
    scores = []
    for ids in sequences:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        scores.append(sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids))))
    return scores


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def real_rows(name: str, count: int) -> list[dict]:
    from densetune.data.loading import find_in_data_dirs

    folder = find_in_data_dirs(name)
    if folder is None:
        pytest.skip(f"needs the LLM-Adapters {name} files (../shared/data/llm-adapters)")
    rows = json.loads((folder / "test.json").read_text())
    return rows[::len(rows) // count][:count]  # spread over the file: questions of different lengths


@pytest.fixture(scope="module")
def smollm2():
    from densetune.trial.models import load_model, load_tokenizer

    # One torch thread: on a 2-core machine shared with other work, two threads ran these passes 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("protocol", ["text", "label"])
def test_packed_scores_equal_one_option_at_a_time_on_smollm2_and_arc_easy(smollm2, protocol):
    model, tokenizer = smollm2
    rows = real_rows("ARC-Easy", 10 if protocol == "text" else 5)  # the label protocol's prompts are longer
    if protocol == "text":
        questions = [text_question(row, "answer") for row in rows]
        contexts, options = [q.contexts[0] for q in questions], [q.continuations for q in questions]
    else:
        contexts = [prompt(row["instruction"]) + LOGLIK_PREFIX for row in rows]
        options = [choices("answer", row["instruction"]) for row in rows]
    expected = [one_at_a_time(model, tokenizer, c, o, protocol == "text") for c, o in zip(contexts, options)]
    pairs = [[(context, option) for option in texts] for context, texts in zip(contexts, options)]
    for batch_size in (1, 16):  # one question at a time, and all ten (of different lengths) in one batch
        scores = _candidate_scores(model, tokenizer, pairs, batch_size, from_context=protocol == "text")
        assert [len(row) for row in scores] == [len(row) for row in expected]
        assert [s for row in scores for s in row] == pytest.approx([s for row in expected for s in row], abs=1e-4)
        assert [argmax(row) for row in scores] == [argmax(row) for row in expected]


def synthetic_questions(count: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Contexts and options of different lengths, some options prefixes of others (their shared tokens)."""
    generator = random.Random(seed)
    words = ["red", "blue", "a", "the cat", "sat", "on", "mat", "7", "seven", "Paris", "é", "x y z"]
    contexts, options = [], []
    for _ in range(count):
        contexts.append("Question: " + " ".join(generator.choices(words, k=generator.randint(1, 30))) + "\nAnswer:")
        texts = [" ".join(generator.choices(words, k=generator.randint(1, 6))) for _ in range(generator.randint(2, 5))]
        texts.append(texts[0] + " more")
        options.append([" " + text for text in texts])
    return contexts, options


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_packed_scores_equal_one_option_at_a_time_on_tiny_llama(llama, tokenizer, precision):
    contexts, options = synthetic_questions(12, seed=0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        expected = [one_at_a_time(llama, tokenizer, c, o, True) for c, o in zip(contexts, options)]
        pairs = [[(context, option) for option in texts] for context, texts in zip(contexts, options)]
        for batch_size in (1, 2, 64):
            scores = _candidate_scores(llama, tokenizer, pairs, batch_size, from_context=True)
            flat_scores, flat_expected = [s for row in scores for s in row], [s for row in expected for s in row]
            if precision == "float32":
                assert flat_scores == pytest.approx(flat_expected, abs=1e-4)
                assert text_picks(llama, tokenizer, pairs, batch_size) == [
                    (argmax(row), argmax([s / len(o[1:]) for s, o in zip(row, texts)]))
                    for row, texts in zip(expected, options)
                ]
            else:
                # bf16 rounds differently in a packed sequence than in one per option (other shapes, other sums):
                # the scores agree to bf16's precision, a few hundredths on sums of tens of tokens.
                assert flat_scores == pytest.approx(flat_expected, abs=0.1, rel=0.01)
