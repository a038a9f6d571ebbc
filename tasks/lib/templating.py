"""The project's Jinja templates (templates/) and the filters that quote what goes into them.

StrictUndefined: a variable missing from the context is an error instead of an empty string.
Every shell value goes through the `q` filter (tasks.lib.quoting.sh_quote) and every compose value
through `cq` (YAML double-quoted, `$` doubled), so hostile values arrive literally. Pure: reads
only templates/.
"""
from __future__ import annotations

from pathlib import Path

import jinja2
import yaml

from tasks.lib.quoting import sh_quote

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"


# -- filters --------------------------------------------------------------------------------------

def compose_quote(value: object) -> str:
    """One YAML double-quoted scalar for a compose file, `$` doubled.

    Compose interpolates `$VAR`, `${VAR}` (and refuses `$(`) in every string value; `$$` is its
    escape for a literal dollar. YAML quoting keeps `yes`, `1`, `null`, `:` and newlines strings.
    """
    text = scalar_text(value, "compose value").replace("$", "$$")
    dumped = yaml.safe_dump(text, default_style='"', allow_unicode=True, width=float("inf"))
    return dumped.rstrip("\n")


def scalar_text(value: object, what: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        # An unset value is a bug, and YAML booleans would arrive as True/true/1 depending on who
        # reads them: make the user write the string they mean.
        raise ValueError(f"{what} {value!r} is not a string or number (quote it in the YAML)")
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["q"] = sh_quote
    env.filters["cq"] = compose_quote
    return env


_ENV = _environment()


def render_template(name: str, **context: object) -> str:
    """Render templates/<name>; a variable the template uses but the context lacks is an error."""
    return _ENV.get_template(name).render(**context)
