"""How prompts, chats and answers become token ids: one definition for serving and calibration."""

from __future__ import annotations

from collections.abc import Sequence


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """A raw prompt, tokenized as is (with the tokenizer's special tokens)."""
    return tokenizer(prompt, add_special_tokens=True).input_ids


def chat_token_ids(tokenizer, messages: Sequence[tuple[str, str | list[dict]]]) -> list[int]:
    """(role, content) messages rendered with the chat template, the assistant turn opened.
    content is text, or a list of parts ({"type": "text", "text": ...}, {"type": "image"}) that
    a vision-language model's template renders with one image token per image."""
    text = tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def pad_token_id(tokenizer) -> int:
    """The token left padding uses (masked out, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def answer_token_ids(tokenizer, answer: str) -> tuple[int, ...]:
    """A candidate answer, tokenized on its own, to follow a prompt."""
    return tuple(tokenizer(answer, add_special_tokens=False).input_ids)


def expand_image_tokens(
    token_ids: Sequence[int], image_token_id: int, tokens_per_image: int
) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """Each image token repeated tokens_per_image times (one per patch, as the model's own
    processor expands it); returns the ids and each image's half-open span of positions."""
    out: list[int] = []
    spans = []
    for token in token_ids:
        if token == image_token_id:
            spans.append((len(out), len(out) + tokens_per_image))
            out.extend([image_token_id] * tokens_per_image)
        else:
            out.append(token)
    return out, tuple(spans)
