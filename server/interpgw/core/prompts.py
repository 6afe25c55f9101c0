"""Turning a client's prompt (text, chat messages or token ids) into validated token ids.

The gateway tokenizes itself, so that it knows every prompt's length before the request reaches the
engine: positions, byte budgets and context limits are all checked up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interpgw.core.errors import InvalidArgument
from interpgw.core.requests import PromptInput, quoted

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Characters one token can stand for, at most, when the tokenizer cannot tell (see `max_token_chars`).
FALLBACK_TOKEN_CHARS = 256


def max_token_chars(tokenizer: Any) -> int:
    """The most characters of text one token of `tokenizer` can stand for (its longest vocabulary entry).

    A text of n characters is then at least n / max_token_chars tokens long, which bounds a prompt's length before
    tokenizing it. Byte-level BPE stores tokens as one character per byte, so an entry's length also bounds the
    characters it decodes to."""
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(token) for token in vocab), default=0)
    except Exception:  # noqa: BLE001 - any tokenizer without a vocabulary listing: a generous fixed bound
        return FALLBACK_TOKEN_CHARS
    return max(longest, 1)


class PromptEncoder:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # Texts longer than this cannot fit in the context, whatever they tokenize to: they are refused before the
        # tokenizer runs (tokenizing megabytes blocks the server's event loop for seconds). The factor 4 leaves
        # room for normalizers that drop characters.
        self.max_token_chars = max_token_chars(tokenizer)
        self.max_text_chars = 4 * self.max_token_chars * max_model_len

    def encode(self, prompt: PromptInput, reserve: int = 1) -> list[int]:
        """Token ids of a prompt; `reserve` tokens of the context must remain for generation."""
        given = [prompt.text is not None, prompt.chat is not None, prompt.token_ids is not None]
        if sum(given) != 1:
            raise InvalidArgument("a prompt needs exactly one of: text, chat messages, token ids")
        if prompt.text is not None:
            if not prompt.text:
                raise InvalidArgument("prompt text is empty")
            self._check_length(len(prompt.text), "prompt text")
            ids = list(self.tokenizer(prompt.text).input_ids)
        elif prompt.chat is not None:
            ids = self._encode_chat(prompt)
        else:
            if len(prompt.token_ids or ()) + reserve > self.max_model_len:  # before looking at every id
                raise InvalidArgument(
                    f"prompt has {len(prompt.token_ids)} tokens and {reserve} more are requested, but the model's "
                    f"context is {self.max_model_len} tokens"
                )
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

    def _check_length(self, n_chars: int, what: str) -> None:
        if n_chars > self.max_text_chars:
            raise InvalidArgument(
                f"{what} has {n_chars} characters: more tokens than the model's context of {self.max_model_len} "
                f"(at most {self.max_text_chars} characters are accepted)"
            )

    def _encode_chat(self, prompt: PromptInput) -> list[int]:
        turns = prompt.chat or ()
        if not turns:
            raise InvalidArgument("chat prompt has no messages")
        for turn in turns:
            if turn.role not in CHAT_ROLES:
                raise InvalidArgument(f"unknown chat role {quoted(turn.role)}; valid roles: {', '.join(CHAT_ROLES)}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("this model has no chat template; send a text prompt instead")
        # every message is at least one token (and the template adds more), so more messages than the context
        # holds cannot fit either
        if len(turns) > self.max_model_len:
            raise InvalidArgument(f"chat prompt has {len(turns)} messages; the model's context is {self.max_model_len}")
        self._check_length(sum(len(t.content) for t in turns), "chat prompt")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": t.role, "content": t.content} for t in turns],
                tokenize=False,
                add_generation_prompt=prompt.add_generation_prompt,
            )
        except Exception as exc:  # noqa: BLE001 - templates reject conversations they do not support (jinja raise)
            raise InvalidArgument(f"the model's chat template refused these messages: {str(exc)[:300]}") from None
        self._check_length(len(text), "chat prompt after the template")
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def single_token(self, token: int | str, what: str) -> int:
        """A token id given as an id or as text that must encode to exactly one token (e.g. " Paris")."""
        if isinstance(token, str):
            if not token or len(token) > self.max_token_chars:
                raise InvalidArgument(f"{what} {quoted(token)} is not exactly one token")
            ids = list(self.tokenizer(token, add_special_tokens=False).input_ids)
            if len(ids) != 1:
                pieces = [self.tokenizer.decode([t]) for t in ids[:10]]
                more = ", ..." if len(ids) > 10 else ""
                raise InvalidArgument(
                    f"{what} {quoted(token)} is {len(ids)} tokens {pieces}{more}; it must be exactly one"
                )
            return ids[0]
        if not 0 <= token < self.vocab_size:
            raise InvalidArgument(f"{what} id {token} out of range: valid ids are [0, {self.vocab_size - 1}]")
        return int(token)

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]
