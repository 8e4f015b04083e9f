"""Which project's batch work a worker takes next, when several have some queued for its model.

Each project's batch lines wait in a queue of their own (core.queue.batch_queue_for); the batch
puller takes a chunk from the project that has had the least work per unit of its weight so far
(start-time fair queueing over chunks). Over time each project gets a share of the worker in
proportion to its weight (`ferry projects set NAME --weight N`, default 1), and a small batch
queued behind a huge one starts at once. A project that comes back after its queue ran empty
starts level with those still queued: it does not bank the turns it missed.

Interactive requests are not in this: they have a queue of their own per model and overtake all
batch work in the engine (workers.batch_puller.BATCH_PRIORITY).
"""

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.tables import Project

log = logging.getLogger(__name__)

# How often a worker reads the projects' weights again.
WEIGHTS_SECONDS = 10.0


@dataclass
class FairShare:
    """The work each project with batch work queued has had, in jobs per unit of weight."""

    taken: dict[str, float] = field(default_factory=dict)

    def order(self, weights: Mapping[str, float]) -> list[str]:
        """The projects with work queued (name -> weight), in the order to try them: least
        served first. Projects not among them are forgotten."""
        floor = min((self.taken[p] for p in weights if p in self.taken), default=0.0)
        self.taken = {p: max(self.taken.get(p, floor), floor) for p in weights}
        return sorted(weights, key=lambda p: (self.taken[p], p))

    def took(self, project: str, jobs: int, weight: float) -> None:
        self.taken[project] = self.taken.get(project, 0.0) + jobs / weight


class Weights:
    """Projects' weights, read from Postgres at most every WEIGHTS_SECONDS; a project it does not
    know (created since) weighs 1, and the last weights read stand while Postgres is away."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.known: dict[str, int] = {}
        self.read_at = float("-inf")

    def of(self, projects: Iterable[str]) -> dict[str, float]:
        if time.monotonic() - self.read_at >= WEIGHTS_SECONDS:
            self.read_at = time.monotonic()
            try:
                with self.sessions() as session:
                    self.known = dict(session.execute(select(Project.name, Project.weight)).all())
            except SQLAlchemyError as exc:
                log.warning("projects' weights not read (%s); keeping the last ones", exc)
        return {p: float(max(self.known.get(p, 1), 1)) for p in projects}
