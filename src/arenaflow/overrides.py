"""The `section.key=value` override syntax of `arenaflow --set` and MLproject's `-P overrides`, parsed into
a nested dict of raw values that recipe.py types by the dataclass fields; RecipeError for both."""

from __future__ import annotations

from .errors import ArenaflowError


class RecipeError(ArenaflowError, ValueError):
    """A recipe file or override that does not match the dataclasses below."""


class Quoted(str):
    """An override value written in quotes: a literal string, never None and never split on commas."""


_QUOTES = "\"'"


def _quoted(text: str, pos: int, item: str) -> tuple[Quoted, int]:
    """The quoted string starting at text[pos] and the index after its closing quote."""
    close = text.find(text[pos], pos + 1)
    if close < 0:
        raise RecipeError(f"override {item!r}: unbalanced {text[pos]} quote")
    return Quoted(text[pos + 1:close]), close + 1


def _list(text: str, pos: int, item: str) -> tuple[list[str], int]:
    """The `[a, "b,c"]` list starting at text[pos] and the index after its `]`."""
    elements: list[str] = []
    pos += 1
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            raise RecipeError(f"override {item!r}: unclosed [")
        if text[pos] == "]" and not elements:
            return elements, pos + 1  # []
        if text[pos] in _QUOTES:
            element, pos = _quoted(text, pos, item)
        else:
            stop = pos
            while stop < len(text) and text[stop] not in ",]" + _QUOTES + "[":
                stop += 1
            element = text[pos:stop].strip()
            if stop < len(text) and text[stop] in _QUOTES + "[":
                raise RecipeError(f"override {item!r}: a list element is bare or entirely quoted, "
                                  "and lists do not nest")
            if not element:
                raise RecipeError(f"override {item!r}: empty list element")
            if any(c.isspace() for c in element):
                raise RecipeError(f"override {item!r}: list element {element!r} has a space; "
                                  "quote it or add the missing comma")
            pos = stop
        elements.append(element)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            raise RecipeError(f"override {item!r}: unclosed [")
        if text[pos] == "]":
            return elements, pos + 1
        if text[pos] != ",":
            raise RecipeError(f"override {item!r}: expected , or ] after list element {element!r}")
        pos += 1


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["train.epochs=2 data.files=a.csv,b.csv"]` -> nested dict of raw values, typed later by `_coerce`.

    Each item (one `--set`, or the whole MLproject `overrides` string) holds `section.key=value`
    overrides separated by whitespace. A value is one of:

    - bare: no whitespace and no quotes (`train.epochs=2`, `data.files=a.csv,b.csv`). It is typed by
      the field: `none`/`null`/empty is None for an Optional field (still the string "none" for a
      plain str field such as quant.scheme); a list field splits it on commas.
    - quoted, the whole value in '...' or "...": the literal string inside, which may hold spaces,
      commas and the other quote (`generate.prompts_file="my prompts.jsonl"`,
      `data.group_column="none"`). It is never None and never split: a list field gets it as its
      one element (a bool or number field converts it as it would the bare text). No escapes.
    - a list, `[a.csv, "b,c.csv"]`: comma-separated elements, each bare (no spaces inside; those
      around it are dropped) or quoted as above; `[]` is empty; lists do not nest.

    Anything else is refused with a RecipeError naming the override: a missing `=`, an unbalanced
    quote or `[`, text glued to a closing quote or `]`, or a quote inside a bare value.
    """
    nested: dict = {}
    for text in overrides or []:
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                break
            start = pos
            while pos < len(text) and not text[pos].isspace() and text[pos] != "=":
                pos += 1
            key, item = text[start:pos], text[start:]  # item: from this override on, for errors
            if pos == len(text) or text[pos] != "=" or not all(key.split(".")):
                raise RecipeError(f"override {item.split()[0]!r}: expected section.key=value "
                                  "(quote a value with spaces: key=\"a b\")")
            pos += 1
            if pos < len(text) and text[pos] in _QUOTES:
                value, pos = _quoted(text, pos, item)
            elif pos < len(text) and text[pos] == "[":
                value, pos = _list(text, pos, item)
            else:
                stop = pos
                while stop < len(text) and not text[stop].isspace():
                    stop += 1
                value, pos = text[pos:stop], stop
                if any(q in value for q in _QUOTES):
                    raise RecipeError(f"override {item.split()[0]!r}: quote the whole value or none of it")
            if pos < len(text) and not text[pos].isspace():
                raise RecipeError(f"override {item!r}: unexpected {text[pos]!r} after the value "
                                  f"of {key}")
            *sections, leaf = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    raise RecipeError(f"override {key}: {section} was set to a value, not a section")
            if isinstance(node.get(leaf), dict):
                raise RecipeError(f"override {key}: {leaf} is a section; set section.key=value")
            node[leaf] = value
    return nested


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, nested sections merged key by key (the YAML, then the overrides)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
