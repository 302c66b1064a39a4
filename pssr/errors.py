"""Errors the CLI shows as one line: the base of pssr's own errors, and one-line text for others
(library errors, torch's C++ frames among them, span many lines)."""


class PssrError(Exception):
    """A pssr error whose message is the one line a user needs (the CLI prints it as is).

    The base that pssr's own errors share (``config.ConfigError`` so far), so that a command can
    catch them all with one ``except PssrError`` and raise ``click.ClickException``.
    """


def first_line(exc: BaseException) -> str:
    """'TypeName: first line of the message'."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
