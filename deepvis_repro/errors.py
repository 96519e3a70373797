"""Errors a user can cause. The CLIs print these as one line and exit non-zero;
anything else is a bug and keeps its traceback."""


class DeepvisError(Exception):
    """A problem with the user's input: a path, a name, a file or a value."""


def did_you_mean(name: str, valid, limit: int = 12) -> str:
    """A short 'valid are: ...' tail for error lines, closest names first."""
    import difflib

    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.6)
    shown = valid if len(valid) <= limit else valid[:limit] + [f"... ({len(valid)} in all)"]
    tail = f"valid: {', '.join(shown)}"
    if close:
        tail = f"did you mean {', '.join(close)}? " + tail
    return tail
