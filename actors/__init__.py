"""Ray layer of raymoe: who runs where. Actors wrap objects from ``raymoe`` (platform/) and never re-implement them."""
from raymoe.actors.coordinator import Coordinator, RayStageGroup
from raymoe.actors.errors import StageDied, StageError
from raymoe.actors.stage import StageActor

__all__ = ["Coordinator", "RayStageGroup", "StageActor", "StageError", "StageDied"]
