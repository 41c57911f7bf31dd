"""What the request handlers share: settings, metrics, the model, index, task and generation services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from duomo.serve.metrics import ServerMetrics
from duomo.serve.search import IndexService
from duomo.serve.service import ModelService
from duomo.serve.settings import ServeSettings
from duomo.serve.tasks import TaskService

if TYPE_CHECKING:  # imported when a generator is served: torch-side sampling code stays out otherwise
    from duomo.serve.chat import ChatService
    from duomo.serve.generation import GenerationService


@dataclass
class ServerState:
    """One per app, at `app.state.duomo`."""

    settings: ServeSettings
    metrics: ServerMetrics
    model: ModelService
    index: IndexService
    tasks: TaskService
    generation: GenerationService | None = None
    chat: ChatService | None = None
    draining: bool = False
