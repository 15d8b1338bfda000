"""The text protocol: questions and options read from LLM-Adapters instructions, and each option's text scored by
log-likelihood after the context (acc) and per byte of its text (acc_norm), against scores computed by hand."""

import pytest
import torch

from densetune.trial.evaluate import accuracy, evaluate, text_picks
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


@pytest.mark.parametrize("row, fmt, expected", [
    (ARC, "answer", TextQuestion(
        "Question: Which tool measures mass?\nAnswer:", [" a ruler", " a balance", " a thermometer", " a clock"], 1,
        ["answer1", "answer2", "answer3", "answer4"],
    )),
    (PIQA, "solution", TextQuestion(
        "Question: How do I dry a shirt?\nAnswer:", [" Hang it in the sun.", " Put it in the freezer."], 0,
        ["solution1", "solution2"],
    )),
    (BOOLQ, "boolean", TextQuestion("Question: is ice cold?\nAnswer:", [" yes", " no"], 0, ["true", "false"])),
])
def test_question_options_and_gold_come_from_the_instruction(row, fmt, expected):
    assert text_question(row, fmt) == expected


def test_training_pairs_by_protocol():
    assert training_pair(ARC, "answer", "label") == (prompt(ARC["instruction"]), "the correct answer is answer2")
    assert training_pair(ARC, "answer", "text") == ("Question: Which tool measures mass?\nAnswer:", " a balance")
    # the label protocol needs no format: it trains on the row's own output
    assert training_pair(ARC, None, "label")[1] == ARC["output"]


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
        scores = [option_log_likelihood(llama, tokenizer, question.context, option) for option in question.options]
        per_byte = [score / len(option.encode()) for score, option in zip(scores, question.options)]
        expected.append((scores.index(max(scores)), per_byte.index(max(per_byte))))
    for batch_size in (1, 3, 16):
        picks = text_picks(llama, tokenizer, [q.context for q in questions], [q.options for q in questions], batch_size)
        assert picks == expected


def test_evaluate_under_the_text_protocol_reports_both_picks(llama, tokenizer):
    rows = [{**ARC, "answer": f"answer{k}"} for k in (2, 4, 1, 3)]  # each option right once: both accuracies 1/4
    predictions = evaluate(llama, tokenizer, "ARC-Easy", rows, mode="generate", protocol="text")
    question = text_question(ARC, "answer")
    ((pick, pick_norm),) = text_picks(llama, tokenizer, [question.context], [question.options])
    labels = ["answer1", "answer2", "answer3", "answer4"]
    for p, row in zip(predictions, rows):
        assert p.extracted == labels[pick] and p.output == question.options[pick].strip()
        assert p.correct == (labels[pick] == row["answer"]) and p.correct_norm == (labels[pick_norm] == row["answer"])
    assert accuracy(predictions) == accuracy(predictions, norm=True) == 1 / 4
    with pytest.raises(ValueError, match="no length-normalised picks"):
        accuracy(evaluate(llama, tokenizer, "ARC-Easy", rows, mode="loglik"), norm=True)
    with pytest.raises(ValueError, match="protocol must be one of label, text; got 'words'"):
        evaluate(llama, tokenizer, "ARC-Easy", rows, protocol="words")
