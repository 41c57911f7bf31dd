"""What the request handlers share: settings, metrics, the model, index and task services."""

from __future__ import annotations

from dataclasses import dataclass

from duomo.serve.metrics import ServerMetrics
from duomo.serve.search import IndexService
from duomo.serve.service import ModelService
from duomo.serve.settings import ServeSettings
from duomo.serve.tasks import TaskService


@dataclass
class ServerState:
    """One per app, at `app.state.duomo`."""

    settings: ServeSettings
    metrics: ServerMetrics
    model: ModelService
    index: IndexService
    tasks: TaskService
    draining: bool = False
