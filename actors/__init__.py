"""Ray layer of raymoe: who runs where. Actors wrap objects from ``raymoe`` (platform/) and never re-implement them."""
from raymoe.actors.coordinator import Coordinator, RayWorkerGroup
from raymoe.actors.errors import StageDied, StageError
from raymoe.actors.stage import StageActor

__all__ = ["Coordinator", "RayWorkerGroup", "StageActor", "StageError", "StageDied"]
