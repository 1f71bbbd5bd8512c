"""Pipeline stages, registered by kind with ``@register_stage``."""

from curate.stages.base import STAGES, MapStage, Stage, StageContext, register_stage

__all__ = ["STAGES", "MapStage", "Stage", "StageContext", "register_stage"]
