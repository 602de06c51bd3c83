"""Render kernel templates with Jinja2 (``StrictUndefined``: a missing variable is an error)."""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any, Mapping

from . import counters
from .errors import TemplateError


@functools.lru_cache(maxsize=None)
def builtin_template_dir() -> Path:
    """jitkern's built-in templates: where this ``jitkern`` package is a source checkout (its parent
    holds ``pyproject.toml`` and ``templates/__init__.py``), the checkout's ``templates/``, so the
    templates always belong to the code that runs (an editable install elsewhere maps
    ``jitkern._templates`` to its own tree); otherwise the package ``jitkern._templates`` (an install
    maps the repository's ``templates/`` there, see pyproject's package-dir), found with
    ``importlib.resources``. Nothing else: a stray ``templates`` directory in site-packages is never
    picked up."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates" / "__init__.py").is_file():
        return checkout / "templates"
    try:
        root = importlib.resources.files("jitkern._templates")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and root.is_dir():
        return root
    raise TemplateError("jitkern's built-in templates are missing (no package jitkern._templates); "
                        "reinstall jitkern (pip install --force-reinstall jitkern)")


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
    counters.bump("renders")
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
