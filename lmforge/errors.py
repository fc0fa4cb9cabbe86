"""The root of every error lmforge raises about its input.

`LmforgeError` derives from ValueError, so `except ValueError` keeps catching what it caught before. `param`
names the flag, config field or request field at fault when one is known: the CLI and the server read it from
there instead of parsing messages.

A message may say `{param}` where it names that setting: `str(e)` writes the field's name there (`max_iters=-5
must be > 0`, as a Python caller or a config file spells it) and `e.render(flag)` the command line's spelling
(`--max-iters=-5 must be > 0`). Messages without the placeholder read the same everywhere.
"""

from __future__ import annotations


class LmforgeError(ValueError):
    """Bad input, named: the message gives the value, what is allowed and the fix; `param` names the field."""

    def __init__(self, message: str = "", param: str | None = None):
        self.template, self.param = message, param
        super().__init__(self.render(param) if param else message)

    def render(self, name: str) -> str:
        """The message with the setting spelled `name` (a flag, a request field, a config key)."""
        return self.template.replace("{param}", name)
