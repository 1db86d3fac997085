"""The one prompt builder: chat template, per-part token budgets, head+tail truncation.

Every row becomes token ids `chat(system, user=<prompt and both responses, turn by turn>)` ending
with the assistant's generation prompt, so the next token is the answer: "A", "B" or "tie".
Finetuning appends the answer token to these ids; every scorer reads the distribution right after
them. Ids are built by concatenating separately tokenized pieces, so the total length is known
exactly and never exceeds `max_length`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .errors import ArenaflowError
from .models import label_token_ids
from .recipe import PromptConfig

SYSTEM = "You judge chatbot answers. Reply with exactly one word: A, B or tie."
INSTRUCTION = "Which response is better? Answer A, B or tie.\n"
TRUNCATION_MARKER = "\n[... truncated ...]\n"
EMPTY_TURN = "(empty)"
_SENTINEL = "\x1eARENAFLOW_CONTENT\x1e"


class PromptError(ArenaflowError, ValueError):
    """The budget cannot hold the fixed parts of the prompt, or the tokenizer has no chat template."""


def fair_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """Water-filling: items shorter than an equal share keep everything; the rest split what is left."""
    shares = [0] * len(lengths)
    pending = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = max(budget, 0)
    while pending:
        equal = left // len(pending)
        i = pending[0]
        if lengths[i] <= equal:
            shares[i] = lengths[i]
            left -= lengths[i]
            pending.pop(0)
        else:
            for k, j in enumerate(pending):
                shares[j] = equal + (1 if k < left - equal * len(pending) else 0)
            break
    return shares


class PromptBuilder:
    def __init__(self, tokenizer, config: PromptConfig):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
        self.tokenizer = tokenizer
        self.config = config
        self.label_ids = label_token_ids(tokenizer)
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _SENTINEL}],
            tokenize=False, add_generation_prompt=True,
        )
        prefix, suffix = rendered.split(_SENTINEL)
        self.prefix = self._ids(prefix)
        self.suffix = self._ids(suffix)
        self.instruction = self._ids(INSTRUCTION)
        self.marker = self._ids(TRUNCATION_MARKER)
        self.empty = self._ids(EMPTY_TURN)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @functools.lru_cache(maxsize=256)
    def _header(self, name: str, turn: int, turns: int) -> list[int]:
        label = f"{name} (turn {turn + 1})" if turns > 1 else name
        return tuple(self._ids(f"\n## {label}\n"))

    def _truncate(self, ids: list[int], keep: int) -> list[int]:
        """Keep `keep` tokens: a head share, the marker, then the tail (the tail matters most)."""
        if len(ids) <= keep:
            return ids
        room = keep - len(self.marker)
        if room <= 0:
            return ids[:keep]
        head = int(room * self.config.head_share)
        return ids[:head] + self.marker + ids[len(ids) - (room - head):]

    def build(self, prompt: Sequence[str | None], response_a: Sequence[str | None],
              response_b: Sequence[str | None]) -> list[int]:
        """Token ids for one row; len(result) <= config.max_length, guaranteed."""
        return self._assemble([[self._ids(t) if t else None for t in part] for part in (prompt, response_a, response_b)])

    def _assemble(self, parts: list[list[list[int] | None]]) -> list[int]:
        """Per-turn token ids of prompt / response A / response B (None = empty turn) -> row ids."""
        turns = max(len(p) for p in parts) or 1
        ids = [[t if t is not None else self.empty for t in part] + [self.empty] * (turns - len(part))
               for part in parts]
        names = ("Prompt", "Response A", "Response B")
        headers = [[self._header(n, t, turns) for t in range(turns)] for n in names]
        fixed = len(self.prefix) + len(self.suffix) + len(self.instruction)
        fixed += sum(len(h) for hs in headers for h in hs)
        content_budget = self.config.max_length - fixed
        if content_budget < 3 * len(self.marker):
            raise PromptError(
                f"max_length={self.config.max_length} leaves {content_budget} tokens for content "
                f"after the template and headers ({fixed} tokens, {turns} turns)"
            )
        totals = [sum(map(len, part)) for part in ids]
        # The prompt gets its share (more if the responses are short); responses split the rest.
        prompt_room = max(int(content_budget * self.config.prompt_share), content_budget - totals[1] - totals[2])
        prompt_budget = min(totals[0], prompt_room)
        budgets = [prompt_budget, *fair_shares(totals[1:], content_budget - prompt_budget)]
        kept = [
            [self._truncate(turn, share) for turn, share in zip(part, fair_shares([len(t) for t in part], budget))]
            for part, budget in zip(ids, budgets)
        ]
        body = list(self.instruction)
        for t in range(turns):
            for p in range(3):
                body += [*headers[p][t], *kept[p][t]]
        return self.prefix + body + self.suffix

    def build_rows(self, rows, swap: bool = False) -> list[list[int]]:
        """Token ids for each row of a canonical table (see data.py); `swap` exchanges A and B."""
        a, b = ("response_b", "response_a") if swap else ("response_a", "response_b")
        columns = [list(rows["prompt"]), list(rows[a]), list(rows[b])]
        texts = sorted({t for column in columns for turns in column for t in turns if t})
        # One batched call: fast tokenizers encode in parallel, and each distinct text only once.
        encoded = dict(zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        return [self._assemble([[encoded[t] if t else None for t in turns] for turns in row])
                for row in zip(*columns)]
