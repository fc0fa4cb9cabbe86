"""The root of every error lmforge raises about its input.

`LmforgeError` derives from ValueError, so `except ValueError` keeps catching what it caught before. `param`
names the flag, config field or request field at fault when one is known: the CLI and the server read it from
there instead of parsing messages.
"""

from __future__ import annotations


class LmforgeError(ValueError):
    """Bad input, named: the message gives the value, what is allowed and the fix; `param` names the field."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param
