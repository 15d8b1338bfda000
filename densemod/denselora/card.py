"""The model card of a saved DenseLoRA adapter: what it is, and that loading it needs densemod."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from huggingface_hub import ModelCard

CARD_TAGS = ("denselora", "densemod")
# PEFT cannot find DenseLoRA unless densemod is imported, and then says only KeyError: 'DENSELORA'; an installed
# densemod is imported with PEFT (densemod_autoload), but the card is the one place beside the weights where a reader
# learns what the adapter needs.
CARD_LINE = (
    "A DenseLoRA (Mu et al., ACL 2025) adapter, made with the densemod library. Loading it needs densemod installed "
    "(`pip install densemod`), which registers DenseLoRA with PEFT as PEFT is imported; where that is turned off "
    "(DENSEMOD_AUTOLOAD=0), `import densemod` before `peft.PeftModel.from_pretrained`, or PEFT stops with "
    "`KeyError: 'DENSELORA'`."
)


def name_in_model_card(folder: Union[str, Path]) -> None:
    """Add DenseLoRA's tags and line to the model card (README.md) PEFT wrote in `folder`; no card, nothing to do."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return
    card = ModelCard.load(path)
    card.data.tags = sorted({*(card.data.tags or []), *CARD_TAGS})
    if CARD_LINE not in card.text:
        card.text = with_line_after_title(card.text, CARD_LINE)
    card.save(path)


def with_line_after_title(text: str, line: str) -> str:
    lines = text.splitlines()
    title = next((i for i, current in enumerate(lines) if current.startswith("# ")), -1)
    return "\n".join([*lines[: title + 1], "", line, *lines[title + 1 :]])
