"""Render kernel templates with Jinja2 (``StrictUndefined``: a missing variable is an error)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

from .errors import TemplateError


def builtin_template_dir() -> Path:
    """The repository's ``templates/`` folder: beside the package in a checkout or editable install,
    inside it as ``jitkern/_templates`` in a wheel (see pyproject's package-dir)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "templates"
    return checkout if checkout.is_dir() else here / "_templates"


@functools.lru_cache(maxsize=None)
def _environment(template_dir: str):
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template_dir: Path, template: str, context: Mapping[str, Any]) -> str:
    """Render ``template`` (relative to ``template_dir``) with ``context``."""
    import jinja2

    env = _environment(str(template_dir))
    where = f"{Path(template_dir) / template}"
    try:
        return env.get_template(template).render(**context)
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template {template!r} not found in {template_dir}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(
            f"template {where}: undefined variable ({e.message}); pass it in the config's params "
            f"or define it in the template"
        ) from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {where}, line {e.lineno}: {e.message}") from None
