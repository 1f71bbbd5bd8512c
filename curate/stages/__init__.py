"""Pipeline stages, registered by kind with ``@register_stage``."""

from curate.core.stage import STAGES, MapStage, Stage, StageContext, register_stage

__all__ = ["STAGES", "MapStage", "Stage", "StageContext", "register_stage"]
