"""``.. smapws-settings::``: the configuration table, generated from
:data:`smapws._config.OPTIONS` (names, flags, defaults and the ``--help``
text), so the documentation cannot list a setting the code lacks, miss one,
or show another default.

The directive's content may add notes to rows, each a variable name alone on
a line followed by its indented text (reStructuredText); a note naming no
setting is an error, so a renamed setting cannot leave its note behind::

    .. smapws-settings::

       SMAPWS_PORT
          0: any free port (the tests use it)
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

from smapws._config import OPTIONS, shown_default


def notes_of(lines: list[str]) -> dict[str, list[str]]:
    """``{variable: note lines}`` from the directive's content; raises
    ``ValueError`` for a note of no setting or text before any name."""
    known = {opt.env for opt in OPTIONS}
    notes: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line and not line[0].isspace():
            name = line.strip()
            if name not in known:
                raise ValueError(f"smapws-settings: a note for {name!r}, which is no setting")
            current = notes.setdefault(name, [])
        elif line.strip():
            if current is None:
                raise ValueError("smapws-settings: note text before any variable name")
            current.append(line.strip())
    return notes


def table_rst(notes: dict[str, list[str]]) -> list[str]:
    """The table as reStructuredText lines, one row per setting in OPTIONS order."""
    out = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 28 26 12 40",
        "",
        "   * - variable",
        "     - flag",
        "     - default",
        "     - meaning",
    ]
    for opt in OPTIONS:
        meaning = " ".join(notes.get(opt.env, [])) or opt.help
        secret = " (a secret: never logged)" if opt.secret else ""
        out += [
            f"   * - ``{opt.env}``",
            f"     - ``{opt.flag}``",
            f"     - ``{shown_default(opt.default)}``",
            f"     - {meaning}{secret}",
        ]
    return out


class SettingsDirective(Directive):
    has_content = True

    def run(self) -> list[nodes.Node]:
        try:
            notes = notes_of(list(self.content))
        except ValueError as exc:
            raise self.error(str(exc)) from None
        container = nodes.container()
        self.state.nested_parse(StringList(table_rst(notes), "smapws-settings"), 0, container)
        return list(container.children)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("smapws-settings", SettingsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
