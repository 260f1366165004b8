import json
from typing import Any

from django import template

register = template.Library()


@register.filter
def as_json(value: Any) -> str:
    """A value as the ``changes`` table shows it (``true``, ``null``, ``"Sleep"``)."""
    return json.dumps(value)

