"""What every config section shares: unknown keys are refused, and assignments are validated too.

A section that is one variant of a tagged union (task, student/teacher, broker) names its variant in a `kind` or
`type` field; `variant_tag` reads it so the loader and `opd run --help` need not know which word a section uses.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

TAG_FIELDS = ("kind", "type")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def variant_tag(model: type[BaseModel]) -> tuple[str, object] | None:
    """The (tag field, tag value) of one union variant, e.g. ("kind", "tiny"); None for a plain section."""
    for name in TAG_FIELDS:
        field = model.model_fields.get(name)
        if field is not None:
            return name, field.default
    return None
