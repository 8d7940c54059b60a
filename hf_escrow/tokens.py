"""Token counts both sides of a sale agree on: the model's tokenizer when one is known,
else a safe upper bound, so that a hold never reserves less than the work can cost.
"""

from __future__ import annotations

from typing import Any

PER_MESSAGE_OVERHEAD_TOKENS = 8  # chat template tokens per message when no tokenizer is known


class TokenCounter:
    """Counts tokens with the model's tokenizer when one is known, else estimates safely."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = _load_tokenizer(tokenizer)

    def prompt_tokens(self, messages: list[dict]) -> tuple[int, bool]:
        """(tokens, exact): exact with a tokenizer, else an upper bound from UTF-8 bytes."""
        if self.tokenizer is not None:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                # transformers 5 returns a BatchEncoding (a mapping), older versions a list of ids
                return len(ids["input_ids"] if hasattr(ids, "keys") else ids), True
            except (ValueError, TypeError, KeyError):
                pass  # no chat template: fall through to the plain count
            return len(self.tokenizer.encode(_messages_text(messages))), True
        return len(_messages_text(messages).encode()) + PER_MESSAGE_OVERHEAD_TOKENS * len(messages), False

    def plain_prompt_tokens(self, text: str) -> tuple[int, bool]:
        """(tokens, exact) of a raw prompt (no chat template), special tokens included as servers add them."""
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"]), True
        return len(text.encode()) + PER_MESSAGE_OVERHEAD_TOKENS, False

    def text_tokens(self, text: str, fallback: int) -> tuple[int, str]:
        """Tokens of delivered text: with the tokenizer, else the number of chunks received."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False)), "tokenizer"
        return fallback, "chunks"


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)


def _messages_text(messages: list[dict]) -> str:
    parts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # multimodal parts: count their text
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)
