"""Choose the adapter for a request: the requested specialty's active adapter, or a nearest-centroid router.

Every active adapter is loaded into the one generator at start-up. Automatic routing embeds the
question and compares it with each adapter's centroid, the normalised mean embedding of the user
turns it was trained on. The closest adapter wins when its cosine similarity reaches the threshold
and beats the runner-up by the margin. Otherwise the bare base model answers: a clinical question
from a specialty without an adapter tends to sit about equally close to several centroids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from assistant.answer.pipeline import AdapterChoice
from assistant.errors import BedsideError, ModelError
from assistant.tuning.registry import ADAPTER_WEIGHTS, AdapterRegistry

logger = logging.getLogger(__name__)

# Chosen with benchmarks/adapters.py (all-MiniLM-L6-v2, the four demo adapters) on the 30 questions of
# corpora/questions/demo_questions.jsonl: 9 of 10 in-specialty questions routed right and 16 of 20
# others sent to the base. NOTE: no separate validation set exists, so that accuracy is optimistic.
# A registry may set its own values (`router.threshold`, `router.margin`).
DEFAULT_THRESHOLD = 0.40
DEFAULT_MARGIN = 0.05


def question_centroid(embedder: Any, questions: list[str]) -> list[float]:
    """Return the unit-length mean of the questions' normalised embeddings."""
    import numpy as np

    if not questions:
        raise BedsideError("no questions to build a routing centroid from")
    vectors = embedder.encode(questions, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    centroid = vectors.mean(axis=0)
    centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    return [round(float(v), 6) for v in centroid]


@dataclass
class Route:
    """A loaded adapter the router may pick, with its centroid (None: selectable only by specialty)."""

    name: str
    specialty: str
    sha256: str
    centroid: Any = None


class AdapterRouter:
    """Pick the adapter for each request; `choose` is safe to call from several threads."""

    def __init__(self, embedder: Any, routes: list[Route], rejected: dict[str, str], threshold: float,
                 margin: float = DEFAULT_MARGIN) -> None:
        import numpy as np

        self.embedder = embedder
        self.routes = {route.specialty: route for route in routes}
        self.rejected = rejected
        self.threshold = threshold
        self.margin = margin
        routable = [r for r in routes if r.centroid is not None]
        self._routable = routable
        self._centroids = np.array([r.centroid for r in routable], dtype=np.float32) if routable else None

    def scores(self, question: str) -> dict[str, float]:
        """Cosine similarity of the question to each routable adapter's centroid, keyed by specialty."""
        if self._centroids is None:
            return {}
        vector = self.embedder.encode([question], normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False)[0]
        similarities = self._centroids @ vector
        return {route.specialty: float(s) for route, s in zip(self._routable, similarities, strict=True)}

    def choose(self, question: str, specialty: str | None = None) -> AdapterChoice:
        if specialty:
            if specialty in self.rejected:
                raise ModelError(self.rejected[specialty])
            route = self.routes.get(specialty)
            if route is None:
                return AdapterChoice(None, specialty, None, f"no active adapter for specialty {specialty!r}")
            return AdapterChoice(route.name, specialty, route.sha256, f"specialty {specialty!r} requested")

        scores = self.scores(question)
        if not scores:
            return AdapterChoice(None, None, None, "no adapter available for automatic routing")
        ranked = sorted(scores, key=scores.get, reverse=True)
        best = ranked[0]
        if scores[best] < self.threshold:
            return AdapterChoice(None, None, None, f"router: best match {best} at similarity {scores[best]:.2f} "
                                                   f"is below the threshold {self.threshold:.2f}; base model")
        if len(ranked) > 1 and scores[best] - scores[ranked[1]] < self.margin:
            return AdapterChoice(None, None, None, f"router: {best} ({scores[best]:.2f}) and {ranked[1]} "
                                                   f"({scores[ranked[1]]:.2f}) are closer than the margin "
                                                   f"{self.margin:.2f}; base model")
        route = self.routes[best]
        return AdapterChoice(route.name, best, route.sha256,
                             f"router: similarity {scores[best]:.2f} to {best} (threshold {self.threshold:.2f})")


def build_router(settings: Any, generator: Any, embedder: Any) -> AdapterRouter:
    """Load every active adapter of `settings.adapters_dir` into `generator` and return the router.

    An adapter that fails its checks (wrong base fingerprint, changed files, no matching modules) is
    not loaded. A request that names its specialty gets the rejection as an error, and automatic
    routing leaves it out, so no request silently runs on the bare base under its name.
    """
    from assistant import models
    from assistant.tuning.loading import load_registered_adapter

    registry = AdapterRegistry(settings.adapters_dir)
    router_settings = registry.router_settings()
    threshold = float(router_settings.get("threshold", DEFAULT_THRESHOLD))
    margin = float(router_settings.get("margin", DEFAULT_MARGIN))
    embedder_fingerprint = models.embedder_fingerprint(models.resolve_embedder(settings.embedder))

    routes: list[Route] = []
    rejected: dict[str, str] = {}
    for entry in registry.active_entries():
        try:
            load_registered_adapter(generator, registry, entry)
        except ModelError as err:
            rejected[entry["specialty"]] = str(err)
            logger.warning("adapter %s not loaded: %s", entry["name"], err)
            continue
        router = entry.get("router") or {}
        centroid = router.get("centroid")
        if centroid is not None and router.get("embedder_fingerprint") != embedder_fingerprint:
            logger.warning("adapter %s: its routing centroid was computed with another embedder, so automatic "
                           "routing skips it (--specialty %s still selects it); re-register it to route",
                           entry["name"], entry["specialty"])
            centroid = None
        routes.append(Route(entry["name"], entry["specialty"], entry["files"][ADAPTER_WEIGHTS], centroid))
    logger.info("router ready: %d adapter(s) loaded, %d rejected, threshold %.2f, margin %.2f",
                len(routes), len(rejected), threshold, margin)
    return AdapterRouter(embedder, routes, rejected, threshold, margin)
