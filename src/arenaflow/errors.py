"""`ArenaflowError`: the base of every error a user can cause (a recipe, an input file, a model reference,
a setting that cannot run here). `arenaflow <verb>` prints these as one line and exits 2; anything else
is a bug and keeps its traceback."""


class ArenaflowError(Exception):
    """A user error: wrong input or settings, reported by the CLI without a traceback."""
