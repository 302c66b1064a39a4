"""One-line error text for the CLI: library errors (torch's C++ frames) span many lines."""


def first_line(exc: BaseException) -> str:
    """'TypeName: first line of the message'."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
