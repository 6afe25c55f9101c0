"""Turning a client's prompt (text, chat messages or token ids) into validated token ids.

The gateway tokenizes itself, so that it knows every prompt's length before the request reaches the
engine: positions, byte budgets and context limits are all checked up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interpgw.core.errors import InvalidArgument
from interpgw.core.requests import PromptInput

CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptEncoder:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def encode(self, prompt: PromptInput, reserve: int = 1) -> list[int]:
        """Token ids of a prompt; `reserve` tokens of the context must remain for generation."""
        given = [prompt.text is not None, prompt.chat is not None, prompt.token_ids is not None]
        if sum(given) != 1:
            raise InvalidArgument("a prompt needs exactly one of: text, chat messages, token ids")
        if prompt.text is not None:
            if not prompt.text:
                raise InvalidArgument("prompt text is empty")
            ids = list(self.tokenizer(prompt.text).input_ids)
        elif prompt.chat is not None:
            ids = self._encode_chat(prompt)
        else:
            ids = [int(t) for t in prompt.token_ids or ()]
            if not ids:
                raise InvalidArgument("prompt token ids are empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(f"token id {bad[0]} out of range: valid ids are [0, {self.vocab_size - 1}]")
        if not ids:
            raise InvalidArgument("prompt is empty after tokenization")
        if len(ids) + reserve > self.max_model_len:
            raise InvalidArgument(
                f"prompt has {len(ids)} tokens and {reserve} more are requested, but the model's context "
                f"is {self.max_model_len} tokens"
            )
        return ids

    def encode_each(self, prompts: Sequence[PromptInput], what: str = "prompt", reserve: int = 1) -> list[list[int]]:
        """Token ids of several prompts; an error names which one ("prompt 3: ...")."""
        encoded = []
        for index, prompt in enumerate(prompts):
            try:
                encoded.append(self.encode(prompt, reserve=reserve))
            except InvalidArgument as exc:
                raise InvalidArgument(f"{what} {index}: {exc}") from None
        return encoded

    def _encode_chat(self, prompt: PromptInput) -> list[int]:
        turns = prompt.chat or ()
        if not turns:
            raise InvalidArgument("chat prompt has no messages")
        for turn in turns:
            if turn.role not in CHAT_ROLES:
                raise InvalidArgument(f"unknown chat role {turn.role!r}; valid roles: {', '.join(CHAT_ROLES)}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("this model has no chat template; send a text prompt instead")
        text = self.tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns],
            tokenize=False,
            add_generation_prompt=prompt.add_generation_prompt,
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def single_token(self, token: int | str, what: str) -> int:
        """A token id given as an id or as text that must encode to exactly one token (e.g. " Paris")."""
        if isinstance(token, str):
            ids = list(self.tokenizer(token, add_special_tokens=False).input_ids)
            if len(ids) != 1:
                pieces = [self.tokenizer.decode([t]) for t in ids]
                raise InvalidArgument(f"{what} {token!r} is {len(ids)} tokens {pieces}; it must be exactly one")
            return ids[0]
        if not 0 <= token < self.vocab_size:
            raise InvalidArgument(f"{what} id {token} out of range: valid ids are [0, {self.vocab_size - 1}]")
        return int(token)

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]
