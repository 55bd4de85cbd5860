"""One exception type for every user-facing mistake.

The CLI turns a ``FactEditError`` into a one-line message and a non-zero exit,
so messages must say what was wrong and what to do instead.
"""


class FactEditError(ValueError):
    """Bad input or state that the user can fix (prompt, subject, file, model...)."""
