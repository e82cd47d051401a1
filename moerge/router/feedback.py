"""`feedback`: routing that learns from outcomes (scores or labels sent to `POST /v1/feedback`).

What is stored (tables `completions` and `feedback`, experts/registry.py; with a SQLite registry in
`feedback.sqlite` beside it, with PostgreSQL in the registry's database):
- at completion time, a compact record per chat completion id: the query routing looked at, the
  method, and the plan (chosen expert or base, its score, the top scores). Retention is bounded:
  the newest `max_completions` (default 10 000) and none older than `completion_ttl_s` (default 7
  days); feedback naming an id that is gone is refused (404);
- per feedback: the completion's query and its embedding, method, arm (the one expert that
  answered, `(base)`, or none for a mixture), the score in [0, 1] and the label; at most
  `max_feedback` rows (default 100 000), the oldest dropped first.

How `feedback` routes a query (it wraps a sequence router, `glider-global` by default):
1. The wrapped router ranks the experts. The arms are its top `explore_k` experts (default 3;
   0 = every expert) plus the base model alone, so exploration is bounded to a few arms.
2. Each arm gets a Beta prior: the wrapped router's choice a mean of 0.5, the other arms 0.25
   (0.5 for base when the wrapped router abstained), with strength `prior_strength`; an expert
   whose learned per-expert prior or threshold says it fails at this score gets less.
3. Feedback on earlier queries near this one (cosine of MiniLM embeddings ≥ `min_sim`, at most
   `neighbours` of them, most similar first) adds its scores to its arm's Beta. With
   `score_margin` > 0 (off by default) each is weighted by `weight`: a failure of an expert on a
   neighbour the wrapped router scored lower for it than this query counts less (a success scored
   higher, likewise). It was meant to keep "uppercase fails on lower-case requests" off upper-case
   requests; measured at 0.02 it did not, and cost date_iso_to_us 12 points
   (docs/results/feedback/README.md), so it is off. Queries are
   embedded with their content masked (`key_text`: digit runs and upper-case runs become
   placeholders), so what is near is the request's shape, not its data: on the feedback-stream
   prompts (training phrasings and content only) a held-out task's own prompts are then its
   nearest (top-10 cosine 0.83-0.91, vs 0.33 unmasked), ahead of its held-in near miss (0.45-0.77).
4. `explore=True` (the service): Thompson sampling, seeded by the query and the amount of feedback
   seen, so the same query in the same state routes the same way, alone or batched.
   `explore=False` (measuring): the arm with the highest posterior mean, ties to the wrapped
   router's order.

Corrections (`POST /v1/feedback` with `correction`: the answer that would have been right). A score
says how one arm did; a correction says how every arm would have done. The service answers the
completion's query again with each of the pool's local experts and the base model alone (greedy, one
batch, at most `REPLAY_MAX_ARMS` experts, the wrapped router's top ones first), compares each answer
with the correction (`answer_matches`: whitespace collapsed, one trailing period, JSON compared as
JSON; case-sensitive, no task knowledge), and stores one row per arm (source `replay`) in one
transaction. Neighbours are then counted per completion (`neighbours` completions, each with all its
rows), and an arm outside the wrapped router's top `explore_k` joins the candidates once a
neighbour's replay shows it right. Replay rows of arms that did not answer the request do not move
the per-expert priors and thresholds below, which describe an arm where it was routed to.

Per-expert priors and thresholds (`FeedbackCalibration`): `moerge calibrate --from-feedback`
folds every stored feedback into them and saves a JSON file; the online mode (every `feedback`
router, as feedback arrives) moves them towards what the feedback says, bounded: nothing moves
before `min_count` feedbacks on that expert, a step moves a value by at most `max_step`, and the
router keeps at most `max_items` feedback items in memory. They apply only to a request with at
least one neighbour: a threshold learned on the phrasings feedback came from does not carry to
other phrasings. Measured on development prompts (the uppercase task's paraphrase family over its
training pool, none near the feedback stream of `moerge eval --feedback-curve`), uppercase's learned
threshold (0.45, from its failures on lower-case requests) sent 11 of 24 upper-case requests away
from the uppercase expert; scoped to requests near feedback, none.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, delete, func, insert, select

from moerge.experts.errors import ExpertError
from moerge.experts.registry import POOL_LOCK_KEY, Registry, completions_table, feedback_metadata, feedback_table
from moerge.router.base import ExpertScore, Router, RoutingDecision, make_router

BASE_ARM = "(base)"
POSITIVE_LABELS = {"good", "correct", "right", "positive", "up", "thumbs_up", "accept", "accepted", "pass", "yes"}
NEGATIVE_LABELS = {"bad", "incorrect", "wrong", "negative", "down", "thumbs_down", "reject", "rejected", "fail",
                   "no"}
CALIBRATION_NAME = "feedback_calibration.json"
REPLAY_MAX_ARMS = 32                 # experts answered again per correction (plus the base model)
MAX_CORRECTION_CHARS = 4000


class FeedbackUnavailableError(ExpertError):
    """503: this server keeps no completion records (MOERGE_FEEDBACK_RECORDS=false, or no registry)."""
    status = 503


class UnknownCompletionError(ExpertError):
    """404: feedback names a completion id this server never answered, or one past its retention."""
    status = 404


def feedback_score(score: float | None, label: str | None) -> tuple[float, str | None]:
    """The reward in [0, 1] from a score and/or a label; ExpertError (400) when neither fits."""
    if score is None and label is None:
        raise ExpertError("feedback needs a score in [0, 1], a label (good/bad, correct/incorrect, ...) or a "
                          "correction (the answer that would have been right)")
    lab = None
    if label is not None:
        lab = label.strip().lower()
        if lab in POSITIVE_LABELS:
            from_label = 1.0
        elif lab in NEGATIVE_LABELS:
            from_label = 0.0
        else:
            raise ExpertError(f"unknown label {label!r}: use one of {', '.join(sorted(POSITIVE_LABELS))} "
                              f"or {', '.join(sorted(NEGATIVE_LABELS))}, or send a score in [0, 1]")
        if score is None:
            score = from_label
        elif abs(float(score) - from_label) > 0.5:
            raise ExpertError(f"score {score} contradicts label {label!r}")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score) \
            or not 0.0 <= float(score) <= 1.0:
        raise ExpertError(f"score must be a number in [0, 1], not {score!r}")
    return float(score), lab


def check_correction(correction) -> str:
    """The correction's text, or ExpertError (400)."""
    if not isinstance(correction, str) or not correction.strip():
        raise ExpertError("correction must be the non-empty text of the answer that would have been right")
    if len(correction) > MAX_CORRECTION_CHARS:
        raise ExpertError(f"correction is {len(correction)} characters; at most {MAX_CORRECTION_CHARS}")
    return correction


def answer_matches(text: str, correction: str) -> bool:
    """Is `text` the corrected answer? Whitespace collapsed and one trailing period dropped on both
    (the task suite's scoring rule, moerge/tasks/base.py); a correction that is a JSON object or list
    is compared as JSON. Case counts: the service does not know the task, and for some tasks case is
    the answer."""
    from moerge.tasks.base import _parse_json, normalise
    want, got = normalise(correction), normalise(text)
    if want[:1] in ("{", "["):
        parsed = _parse_json(want)
        if parsed is not None:
            return (_parse_json(got) or _parse_json(text.strip())) == parsed
    return got == want


def replay_arms(plan: dict, experts: list[str], max_arms: int = REPLAY_MAX_ARMS) -> list[str]:
    """The arms a correction replays: the completion's recorded top experts first, then the pool's
    other local experts in name order, at most `max_arms`, then the base model alone."""
    top = [name for name, _ in plan.get("top", []) if name in experts]
    rest = sorted(set(experts) - set(top))
    return (top + rest)[:max_arms] + [BASE_ARM]


def arm_decision(arm: str) -> RoutingDecision:
    """The routing decision that answers with one arm: an expert pinned, or the base model alone."""
    if arm == BASE_ARM:
        return RoutingDecision("base", "none", abstained=True)
    return RoutingDecision("pinned", "sequence", experts=[ExpertScore(arm, 1.0)], chosen=[arm])


def replay_max_tokens(tokenizer, correction: str) -> int:
    """Enough new tokens for an answer as long as the correction, and a little more: a longer answer
    cannot match it."""
    return min(512, len(tokenizer(correction)["input_ids"]) + 8)


_DIGITS = re.compile(r"\d+")
_CAPS = re.compile(r"\b[A-Z]{2,}\b(?:\s+\b[A-Z]{2,}\b)*")


def key_text(query: str) -> str:
    """The text whose embedding finds neighbours: the query with its data masked (digit runs -> 0,
    runs of upper-case words -> TEXT), so two requests of one kind are near whatever their data."""
    return _CAPS.sub("TEXT", _DIGITS.sub("0", query))


def embed_key(embed, query: str) -> np.ndarray:
    return np.asarray(embed([key_text(query)])[0], dtype=np.float32)


def plan_record(decision, execution_kind: str | None = None) -> dict:
    """The compact record of what a completion routed to: which arm answered and at what score."""
    chosen = list(decision.chosen)
    abstained = bool(decision.abstained) or not chosen or execution_kind == "base"
    scores = {e.name: float(e.score) for e in decision.experts}
    if abstained:
        arm = BASE_ARM
    elif len(chosen) == 1 and decision.granularity == "sequence":
        arm = chosen[0]
    else:
        arm = None                        # a mixture or a merge: no single arm to credit
    return {"chosen": chosen, "abstained": abstained, "kind": execution_kind or decision.granularity, "arm": arm,
            "arm_score": scores.get(arm) if arm and arm != BASE_ARM and decision.method != "pinned" else None,
            "top": [[e.name, round(float(e.score), 6)] for e in decision.experts[:5]],
            "base_method": (decision.detail or {}).get("base_method")}


@dataclass
class FeedbackItem:
    id: int
    completion_id: str
    arm: str | None
    score: float
    embedding: np.ndarray | None
    arm_score: float | None = None
    query: str = ""
    method: str = ""
    created_at: float = 0.0
    source: str = "api"
    routed: bool = True             # this arm answered the request (a replay row of another arm: False)


def feedback_engine(registry: Registry):
    """The database of the completion and feedback tables, created if missing. With a SQLite registry, a file
    of its own beside the registry's (feedback.sqlite): chats write a record each, and those writes must not
    hold the registry's write lock (registrations would wait on them) nor change its file. With PostgreSQL,
    the registry's own database (row locks only), under its advisory lock while tables are created."""
    engine = registry.engine
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        path = Path(engine.url.database).with_name("feedback.sqlite")
        engine = create_engine(f"sqlite:///{path}", future=True,
                               connect_args={"timeout": registry.busy_timeout_s})
    with registry.typed_errors(), engine.begin() as conn:
        if registry.is_postgres:
            conn.execute(select(func.pg_advisory_xact_lock(POOL_LOCK_KEY)))
        feedback_metadata.create_all(conn)
    return engine


class FeedbackStore:
    """Completion records and feedback rows in the registry's database (SQLite or PostgreSQL)."""

    def __init__(self, registry: Registry, *, max_completions: int = 10_000, completion_ttl_s: float = 7 * 86400,
                 max_feedback: int = 100_000, prune_every: int = 100):
        self.registry = registry
        self.engine = feedback_engine(registry)
        self.max_completions, self.completion_ttl_s = max_completions, completion_ttl_s
        self.max_feedback, self.prune_every = max_feedback, prune_every
        self._writes = 0
        self._listeners: list = []
        self._lock = threading.Lock()

    # -- completions -------------------------------------------------------------------------
    def record_completion(self, completion_id: str, *, model: str, method: str, query: str, plan: dict,
                          now: float | None = None) -> None:
        row = {"id": completion_id, "created_at": now or time.time(), "model": model[:128], "method": method[:64],
               "query": query, "plan": json.dumps(plan)}
        with self.registry.typed_errors(), self.engine.begin() as conn:
            conn.execute(insert(completions_table).values(**row))
        self._maybe_prune()

    def completion(self, completion_id: str) -> dict | None:
        cutoff = time.time() - self.completion_ttl_s
        with self.registry.typed_errors(), self.engine.connect() as c:
            row = c.execute(select(completions_table).where(completions_table.c.id == completion_id)).first()
        if row is None or row.created_at < cutoff:
            return None
        return {"id": row.id, "created_at": row.created_at, "model": row.model, "method": row.method,
                "query": row.query, "plan": json.loads(row.plan)}

    def prune(self, now: float | None = None) -> None:
        """Drop completions past the TTL or beyond the newest `max_completions`, and feedback beyond the
        newest `max_feedback`."""
        now = now or time.time()
        with self.registry.typed_errors(), self.engine.begin() as conn:
            conn.execute(delete(completions_table).where(completions_table.c.created_at < now - self.completion_ttl_s))
            n = conn.execute(select(func.count()).select_from(completions_table)).scalar_one()
            if n > self.max_completions:
                newest = completions_table.c.created_at.desc()
                edge = conn.execute(select(completions_table.c.created_at).order_by(newest)
                                    .offset(self.max_completions - 1).limit(1)).scalar_one()
                conn.execute(delete(completions_table).where(completions_table.c.created_at < edge))
            n = conn.execute(select(func.count()).select_from(feedback_table)).scalar_one()
            if n > self.max_feedback:
                edge = conn.execute(select(feedback_table.c.id).order_by(feedback_table.c.id.desc())
                                    .offset(self.max_feedback - 1).limit(1)).scalar_one()
                conn.execute(delete(feedback_table).where(feedback_table.c.id < edge))

    def _maybe_prune(self) -> None:
        with self._lock:
            self._writes += 1
            due = self._writes % self.prune_every == 0
        if due:
            self.prune()

    # -- feedback ----------------------------------------------------------------------------
    def _known(self, completion_id: str) -> dict:
        """The completion's record, or UnknownCompletionError (404)."""
        rec = self.completion(completion_id)
        if rec is None:
            raise UnknownCompletionError(
                f"no completion {completion_id!r} here: feedback must name the id of a chat completion this "
                f"service answered in the last {self.completion_ttl_s / 86400:g} days (newest "
                f"{self.max_completions} kept)")
        return rec

    def add_feedback(self, completion_id: str, *, score: float | None = None, label: str | None = None,
                     embed=None, source: str = "api") -> FeedbackItem:
        """Validate, then store one feedback row for a known completion; nothing is stored on an error."""
        value, lab = feedback_score(score, label)
        rec = self._known(completion_id)
        vec = embed_key(embed, rec["query"]) if embed is not None else None
        plan = rec["plan"]
        now = time.time()
        row = {"completion_id": completion_id, "created_at": now, "completed_at": rec["created_at"],
               "method": rec["method"], "arm": plan.get("arm"), "score": value, "label": lab, "query": rec["query"],
               "embedding": vec.tobytes() if vec is not None else None, "plan": json.dumps(plan), "source": source}
        with self.registry.typed_errors(), self.engine.begin() as conn:
            fid = conn.execute(insert(feedback_table).values(**row)).inserted_primary_key[0]
        self._maybe_prune()
        item = FeedbackItem(int(fid), completion_id, plan.get("arm"), value, vec, plan.get("arm_score"),
                            rec["query"], rec["method"], now)
        for listener in list(self._listeners):
            listener(item)
        return item

    def add_correction(self, completion_id: str, correction: str, answer, *, experts: list[str],
                       score: float | None = None, label: str | None = None, embed=None,
                       max_arms: int = REPLAY_MAX_ARMS, source: str = "api") -> dict:
        """A correction (module docstring): `answer(query, arms)` answers the completion's query with each arm
        (`{arm: text}`, BASE_ARM for the base model alone) and every arm's answer is compared with the
        correction. One row per arm (source "replay"), plus the client's own score or label when given
        (source `source`), all in one transaction: on any error (a bad value, an unknown id, an engine
        failure) nothing is stored. Returns what was stored and which arms were right."""
        check_correction(correction)
        if score is not None or label is not None:
            given = feedback_score(score, label)
        else:
            given = None
        rec = self._known(completion_id)
        plan = rec["plan"]
        arms = replay_arms(plan, experts, max_arms)
        texts = answer(rec["query"], arms)
        missing = [a for a in arms if a not in texts]
        if missing:
            raise RuntimeError(f"the replay answered no text for {missing}")
        outcomes = {a: float(answer_matches(texts[a], correction)) for a in arms}
        vec = embed_key(embed, rec["query"]) if embed is not None else None
        now = time.time()
        top = {name: score_ for name, score_ in plan.get("top", [])}
        base_row = {"completion_id": completion_id, "created_at": now, "completed_at": rec["created_at"],
                    "method": rec["method"], "query": rec["query"],
                    "embedding": vec.tobytes() if vec is not None else None}
        rows = []
        if given is not None:
            rows.append({**base_row, "arm": plan.get("arm"), "score": given[0], "label": given[1],
                         "plan": json.dumps(plan), "source": source})
        for a in arms:
            if given is not None and a == plan.get("arm"):
                continue                     # the client said how the answering arm did
            replayed = {**plan, "arm_score": top.get(a) if a != BASE_ARM else None, "replayed": a}
            rows.append({**base_row, "arm": a, "score": outcomes[a], "label": "correction",
                         "plan": json.dumps(replayed), "source": "replay"})
        with self.registry.typed_errors(), self.engine.begin() as conn:
            ids = [conn.execute(insert(feedback_table).values(**row)).inserted_primary_key[0] for row in rows]
        self._maybe_prune()
        items = [FeedbackItem(int(fid), completion_id, row["arm"], row["score"], vec,
                              json.loads(row["plan"]).get("arm_score"), rec["query"], rec["method"], now,
                              row["source"], row["source"] != "replay" or row["arm"] == plan.get("arm"))
                 for fid, row in zip(ids, rows)]
        for item in items:
            for listener in list(self._listeners):
                listener(item)
        return {"ids": [it.id for it in items], "arm": plan.get("arm"), "method": rec["method"],
                "score": given[0] if given is not None else outcomes.get(plan.get("arm")),
                "replayed": len(arms), "right": [a for a in arms if outcomes[a] >= 0.5]}

    def items(self, since_id: int = 0, limit: int | None = None) -> list[FeedbackItem]:
        """Feedback rows with id > since_id, oldest first (the newest `limit` when given)."""
        t = feedback_table
        stmt = select(t.c.id, t.c.completion_id, t.c.arm, t.c.score, t.c.embedding, t.c.plan, t.c.query, t.c.method,
                      t.c.created_at, t.c.source).where(t.c.id > since_id)
        stmt = stmt.order_by(t.c.id.desc()).limit(limit) if limit else stmt.order_by(t.c.id)
        with self.registry.typed_errors(), self.engine.connect() as c:
            rows = c.execute(stmt).all()
        if limit:
            rows = rows[::-1]
        out = []
        for r in rows:
            plan = json.loads(r.plan)
            vec = np.frombuffer(r.embedding, dtype=np.float32).copy() if r.embedding is not None else None
            out.append(FeedbackItem(r.id, r.completion_id, r.arm, float(r.score), vec, plan.get("arm_score"),
                                    r.query, r.method, r.created_at, r.source or "api",
                                    r.source != "replay" or r.arm == plan.get("arm")))
        return out

    def last_id(self) -> int:
        with self.registry.typed_errors(), self.engine.connect() as c:
            return int(c.execute(select(func.max(feedback_table.c.id))).scalar() or 0)

    def count(self) -> int:
        with self.registry.typed_errors(), self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(feedback_table)).scalar_one())

    def subscribe(self, listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


_STORES: "weakref.WeakKeyDictionary[Registry, FeedbackStore]" = weakref.WeakKeyDictionary()


def store_for(registry: Registry, **options) -> FeedbackStore:
    """One store per registry in a process, so the service's endpoint and the routers share listeners."""
    if registry not in _STORES:
        _STORES[registry] = FeedbackStore(registry, **options)
    return _STORES[registry]


# -- per-expert priors and thresholds ---------------------------------------------------------------
@dataclass
class ArmStats:
    prior: float = 0.5               # the arm's success rate over all feedback on it (shrunk towards 0.5)
    threshold: float | None = None   # below this score of the wrapped router the arm failed
    n: int = 0
    successes: float = 0.0


@dataclass
class FeedbackCalibration:
    arms: dict[str, ArmStats] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    @staticmethod
    def target(items: list[FeedbackItem], min_count: int = 5) -> dict[str, ArmStats]:
        """What all of `items` say, per arm: success rate (Beta(1, 1) shrunk) and, with both outcomes
        seen at least twice, the score threshold that best separates them (calibrate.best_threshold)."""
        from moerge.router.calibrate import best_threshold
        by_arm: dict[str, list[FeedbackItem]] = {}
        for it in items:
            if it.arm and it.routed:          # a replay of an arm nobody routed to says nothing of its routing
                by_arm.setdefault(it.arm, []).append(it)
        out = {}
        for arm, its in by_arm.items():
            s = sum(it.score for it in its)
            st = ArmStats(prior=(s + 1.0) / (len(its) + 2.0), n=len(its), successes=s)
            scored = [it for it in its if it.arm_score is not None]
            good = [it.arm_score for it in scored if it.score >= 0.5]
            bad = [it.arm_score for it in scored if it.score < 0.5]
            if len(its) >= min_count and len(good) >= 2 and len(bad) >= 2:
                thr, acc = best_threshold(good, bad)
                if acc >= 0.75:               # a threshold only where scores do separate outcomes
                    st.threshold = thr
            out[arm] = st
        return out

    @classmethod
    def from_items(cls, items: list[FeedbackItem], min_count: int = 5) -> "FeedbackCalibration":
        return cls(cls.target(items, min_count), {"n": len(items), "min_count": min_count,
                                                 "made_at": round(time.time(), 3)})

    @classmethod
    def load(cls, path: Path | None) -> "FeedbackCalibration":
        if path is None or not Path(path).exists():
            return cls()
        data = json.loads(Path(path).read_text())
        return cls({a: ArmStats(**v) for a, v in data.get("arms", {}).items()}, data.get("detail", {}))

    def save(self, path: Path) -> None:
        data = {"arms": {a: vars(s) for a, s in sorted(self.arms.items())}, "detail": self.detail}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


class OnlineCalibration:
    """The bounded online mode: per-arm priors and thresholds move towards what the feedback seen so
    far says, at most `max_step` per feedback, and only once an arm has `min_count` feedbacks."""

    def __init__(self, start: FeedbackCalibration, *, min_count: int = 5, max_step: float = 0.05,
                 max_items_per_arm: int = 200):
        self.arms = {a: ArmStats(**vars(s)) for a, s in start.arms.items()}
        self.min_count, self.max_step = min_count, max_step
        self._recent: dict[str, deque] = {}
        self.max_items_per_arm = max_items_per_arm

    def update(self, item: FeedbackItem) -> None:
        if not item.arm or not item.routed:
            return
        recent = self._recent.setdefault(item.arm, deque(maxlen=self.max_items_per_arm))
        recent.append(item)
        if len(recent) < self.min_count:
            return
        goal = FeedbackCalibration.target(list(recent), self.min_count)[item.arm]
        cur = self.arms.setdefault(item.arm, ArmStats())
        cur.prior += float(np.clip(goal.prior - cur.prior, -self.max_step, self.max_step))
        if goal.threshold is not None:
            cur.threshold = goal.threshold if cur.threshold is None else \
                cur.threshold + float(np.clip(goal.threshold - cur.threshold, -self.max_step, self.max_step))
        cur.n, cur.successes = goal.n, goal.successes


class FeedbackMemory:
    """The newest `max_items` feedback items with an arm and an embedding, as one matrix."""

    def __init__(self, max_items: int = 5000):
        self.max_items = max_items
        self.items: deque[FeedbackItem] = deque(maxlen=max_items)
        self._matrix: np.ndarray | None = None
        self.version = 0
        self.last_id = 0

    def add(self, item: FeedbackItem) -> None:
        self.last_id = max(self.last_id, item.id)
        if item.arm is None or item.embedding is None:
            return
        self.items.append(item)
        self._matrix = None
        self.version += 1

    def neighbours(self, q: np.ndarray, k: int, min_sim: float) -> list[tuple[FeedbackItem, float]]:
        """Every item of the `k` completions nearest to `q` (cosine ≥ min_sim), most similar first: a
        correction's replay rows count as one neighbour, not as one per arm."""
        if not self.items:
            return []
        if self._matrix is None:
            self._matrix = np.stack([it.embedding for it in self.items]).astype(np.float32)
        sims = self._matrix @ q.astype(np.float32)
        order = np.argsort(-sims, kind="stable")
        items = list(self.items)
        out, completions = [], set()
        for i in order:
            if sims[i] < min_sim:
                break
            cid = items[i].completion_id
            if cid not in completions:
                if len(completions) == k:
                    continue
                completions.add(cid)
            out.append((items[i], float(sims[i])))
        return out


class FeedbackRouter(Router):
    """See the module docstring. Options: base (the wrapped sequence router), explore_k, explore,
    min_sim, neighbours, prior_strength, min_count, max_step, max_items, refresh_s, score_margin,
    calibration_path."""

    name = "feedback"
    granularity = "sequence"

    def __init__(self, base: str = "glider-global", *, explore_k: int = 3, explore: bool = True,
                 min_sim: float = 0.65, neighbours: int = 16, prior_strength: float = 2.0, min_count: int = 5,
                 max_step: float = 0.05, max_items: int = 5000, refresh_s: float = 1.0,
                 score_margin: float = 0.0,
                 calibration_path: str | Path | None = None, store: FeedbackStore | None = None,
                 base_router: Router | None = None, use_calibration: bool = True):
        self.base_name, self.explore_k, self.explore = base, explore_k, explore
        self.min_sim, self.k, self.prior_strength = min_sim, neighbours, prior_strength
        self.min_count, self.max_step, self.max_items, self.refresh_s = min_count, max_step, max_items, refresh_s
        self.calibration_path, self.score_margin = calibration_path, score_margin
        self._store, self._base_router, self.use_calibration = store, base_router, use_calibration
        self._lock = threading.RLock()
        self._checked = 0.0

    def fit(self, ctx) -> "FeedbackRouter":
        self.ctx = ctx
        self.base = self._base_router or make_router(self.base_name, ctx, use_calibration=self.use_calibration)
        if self.base.granularity != "sequence":
            raise ExpertError(f"feedback wraps a sequence-level router, not {self.base_name!r}")
        self.store = self._store or store_for(ctx.pool.registry)
        path = self.calibration_path
        if path is None and getattr(ctx.pool, "root", None) is not None:
            path = Path(ctx.pool.root) / CALIBRATION_NAME
        self.calibration = OnlineCalibration(FeedbackCalibration.load(path), min_count=self.min_count,
                                             max_step=self.max_step)
        self.memory = FeedbackMemory(self.max_items)
        for it in self.store.items(limit=self.max_items):
            self._learn(it)
        self.store.subscribe(self._on_feedback)
        return self

    def close(self) -> None:
        self.store.unsubscribe(self._on_feedback)

    # -- online learning -----------------------------------------------------------------------
    def _learn(self, item: FeedbackItem) -> None:
        if item.id <= self.memory.last_id:
            return                                   # seen (a listener call and a poll may both bring it)
        if item.embedding is None and item.arm is not None and item.query:
            item.embedding = embed_key(self.ctx.embed, item.query)
        self.memory.add(item)
        self.calibration.update(item)

    def _on_feedback(self, item: FeedbackItem) -> None:
        with self._lock:
            self._learn(item)

    def _refresh(self) -> None:
        """Feedback other processes stored (replicas on one registry), at most every refresh_s."""
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return
        self._checked = now
        for it in self.store.items(since_id=self.memory.last_id, limit=self.max_items):
            self._learn(it)

    # -- routing -------------------------------------------------------------------------------
    def arms(self, ranked: list[ExpertScore]) -> list[str]:
        k = len(ranked) if self.explore_k <= 0 else self.explore_k
        return [e.name for e in ranked[:k]] + [BASE_ARM]

    def priors(self, base: RoutingDecision, arms: list[str], learned: bool = True) -> dict[str, tuple[float, float]]:
        """arm -> (alpha, beta) of its Beta prior; with `learned`, moved by the per-expert priors and
        thresholds learned from feedback."""
        scores = {e.name: e.score for e in base.experts}
        top = None if base.abstained or not base.chosen else base.chosen[0]
        out = {}
        for arm in arms:
            if arm == BASE_ARM:
                mean = 0.5 if top is None else 0.25
            else:
                mean = 0.5 if arm == top else 0.25
            st = self.calibration.arms.get(arm) if learned else None
            if st is not None and st.n >= self.min_count:
                mean = 0.5 * mean + 0.5 * st.prior             # learned: how often this arm works at all
                if arm != BASE_ARM and st.threshold is not None and scores.get(arm, 0.0) < st.threshold:
                    mean = min(mean, 0.1)                      # below its learned threshold it failed
            mean = float(np.clip(mean, 0.02, 0.98))
            out[arm] = (mean * self.prior_strength, (1 - mean) * self.prior_strength)
        return out

    def weight(self, item: FeedbackItem, score_here: float | None) -> float:
        """How much a neighbour's outcome on an expert says about this query. The wrapped router's score
        is taken as monotone evidence of fit: a failure at a lower score than this query's says less the
        higher this query scores that expert (and a success at a higher score, the lower it scores), with
        a decay of `score_margin` per step past a margin of `score_margin`. Base, and items without a
        score, weigh 1."""
        if item.arm == BASE_ARM or item.arm_score is None or score_here is None or self.score_margin <= 0:
            return 1.0
        gap = score_here - item.arm_score if item.score < 0.5 else item.arm_score - score_here
        return float(np.exp(-max(0.0, gap - self.score_margin) / self.score_margin))

    def route(self, query, *, task=None):
        t0 = time.perf_counter()
        base = self.base.route(query, task=task)
        with self._lock:
            self._refresh()
            # no feedback yet: no neighbours to look for, so no embedding to compute
            near = self.memory.neighbours(embed_key(self.ctx.embed, query), self.k, self.min_sim) \
                if self.memory.items else []
            arms = self.arms(base.experts)
            known = {e.name for e in base.experts}
            # an arm a neighbour's correction showed right is a candidate, ranked by the wrapped router or not
            arms += sorted({it.arm for it, _ in near if it.score >= 0.5 and it.arm not in arms
                            and (it.arm == BASE_ARM or it.arm in known)})
            # learned priors and thresholds only near feedback (module docstring)
            priors = self.priors(base, arms, learned=bool(near))
            version = self.memory.version
        post = {a: list(p) for a, p in priors.items()}
        seen = {a: [0, 0.0, 0.0] for a in arms}
        scores = {e.name: e.score for e in base.experts}
        for it, _sim in near:
            if it.arm in post:
                w = self.weight(it, scores.get(it.arm))
                post[it.arm][0] += w * it.score
                post[it.arm][1] += w * (1.0 - it.score)
                seen[it.arm][0] += 1
                seen[it.arm][1] += it.score
                seen[it.arm][2] += w
        means = {a: ab[0] / (ab[0] + ab[1]) for a, ab in post.items()}
        if self.explore:
            seed = int.from_bytes(hashlib.sha256(f"{query}\x00{version}".encode()).digest()[:8], "little")
            rng = np.random.default_rng(seed)
            value = {a: float(rng.beta(*post[a])) for a in arms}
        else:
            value = means
        arm = max(arms, key=lambda a: (value[a], -arms.index(a)))     # ties: the wrapped router's order
        abstain = arm == BASE_ARM
        detail = {"base_method": self.base.name, "base_chosen": list(base.chosen), "base_abstained": base.abstained,
                  "neighbours": len({it.completion_id for it, _ in near}), "explore": self.explore,
                  "arms": {a: {"mean": round(means[a], 4), "n": seen[a][0], "successes": round(seen[a][1], 3),
                               "weight": round(seen[a][2], 3)} for a in arms}}
        if self.explore:
            detail["sampled"] = {a: round(v, 4) for a, v in value.items()}
        decision = RoutingDecision(method=self.name, granularity=self.granularity, experts=list(base.experts),
                                   chosen=[] if abstain else [arm], abstained=abstain, instruction=base.instruction,
                                   detail=detail)
        decision.latency_ms = (time.perf_counter() - t0) * 1000
        return decision
