"""The filter stage: a filter set (``curate.core.filtering``) as a step of a recipe."""

from __future__ import annotations

from dataclasses import dataclass

from curate.core.filtering import FilterSet
from curate.core.stage import register_stage


@register_stage("filter")
@dataclass
class FilterStage(FilterSet):
    """Apply a filter set; rows the filters drop record the first filter that failed."""
