"""The one error a grammar backend raises for user input it cannot compile."""


class GrammarError(ValueError):
    """An invalid or unsupported regex / JSON Schema / grammar; the message names the problem."""
