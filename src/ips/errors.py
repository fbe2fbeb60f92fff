"""One-line error text, and errors that say where they happened (no package imports)."""

from __future__ import annotations


def one_line(err: BaseException, limit: int | None = None) -> str:
    """The error's message on one line (its type's name when it has none); for an error
    re-raised from a `DataLoader` worker, the original error's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
        if ": " in text and text.split(": ", 1)[0].isidentifier():
            text = text.split(": ", 1)[1]  # "ValueError: msg" -> "msg"
    text = " ".join(text.split()) or type(err).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def located(err: BaseException, where: str) -> BaseException:
    """``err`` with ``where`` (e.g. ``labels.csv:12``) in front of its one-line message, as an
    error of the same type where that type takes a message; ``err`` itself otherwise."""
    message = one_line(err)
    if message.startswith(where):
        return err
    try:
        renamed = type(err)(f"{where}: {message}")
    except Exception:  # an exception type with another constructor
        return err
    return renamed
