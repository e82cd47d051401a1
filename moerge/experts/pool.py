"""The expert pool: registry + artifact store, with atomic registration.

Registering validates everything in memory first, then under the pool lock stages each
artifact (fsynced), renames it to its content address, and inserts the card in one DB
transaction. The DB row is the commit point: a crash before it leaves only unreferenced
blobs and staging files, which the next `ExpertPool(...)` sweeps away under the same lock,
so the pool is exactly as it was. A registration that fails without a crash (a full disk,
the registry locked by another process) removes what it staged and published before it
raises, without reading the registry.

The pool lock is a flock on `<root>/.lock` and, with a PostgreSQL registry, also that database's advisory
lock, so replicas on several hosts serialise their writes even where they share no file lock. Listeners
hear of this process's changes at once and of other processes' within `poll_s` (moerge.experts.changes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy.exc import IntegrityError

from moerge.experts.card import MAX_ANSWERED_EXAMPLES, AnsweredExample, ExpertCard, check_name
from moerge.experts.changes import ChangeListener, PoolChangeFeed
from moerge.experts.errors import ExpertError, NameTakenError, UnknownExpertError, storage_full
from moerge.experts.lora import BaseModelSpec, LoraAdapter, load_lora
from moerge.experts.model_ref import validate_model_expert
from moerge.experts.registry import Registry
from moerge.experts.store import open_store
from moerge.kernels.arrow import arrow_prototypes

EmbedFn = Callable[[list[str]], np.ndarray]


def _answered(rows: list[dict] | None) -> list[AnsweredExample]:
    """Answered examples from dicts {"prompt", "answer"} (or AnsweredExample), or a clear error."""
    rows = list(rows or [])
    if len(rows) > MAX_ANSWERED_EXAMPLES:
        raise ExpertError(f"{len(rows)} answered examples: at most {MAX_ANSWERED_EXAMPLES} are kept per expert")
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, AnsweredExample):
            out.append(r)
            continue
        try:
            out.append(AnsweredExample.model_validate(r))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise ExpertError(f"answered example {i}: {where or 'row'}: {err.get('msg')}; each is "
                              "{\"prompt\": \"...\", \"answer\": \"...\"}") from None
    return out


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


class ExpertPool:
    def __init__(self, root: Path, registry_url: str, base_spec: BaseModelSpec | None = None,
                 *, embed: EmbedFn | None = None, max_rank: int = 256, max_upload_bytes: int | None = None,
                 base_spec_loader: Callable[[], BaseModelSpec] | None = None, busy_timeout_s: float = 5.0,
                 poll_s: float = 1.0, store_url: str | None = None, storage_options: dict | None = None,
                 max_esft_bytes: int | None = None):
        """`poll_s`: how often to look for other processes' changes once a listener is subscribed (0: never).
        `store_url`: keep the blobs at this fsspec URL (s3://bucket/prefix) instead of under `root`, which then
        holds the lock, staging and a read cache (moerge.experts.remote_store; `storage_options` go to fsspec).
        `max_esft_bytes`: the largest ESFT weights file accepted (ESFT adapters hold whole experts: 100s of MB)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = open_store(self.root, store_url, storage_options)
        self.registry = Registry(registry_url, busy_timeout_s=busy_timeout_s)
        self._base_spec = base_spec
        self._base_spec_loader = base_spec_loader
        self._embed = embed
        self.max_rank = max_rank
        self.max_upload_bytes = max_upload_bytes
        self.max_esft_bytes = max_esft_bytes
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        with self.locked():
            self.registry.recover()
            self.store.sweep(self.registry.referenced_digests())
            self.changes = PoolChangeFeed(self.registry, self._thread_lock, poll_s)

    # -- plumbing -----------------------------------------------------------------
    @property
    def base_spec(self) -> BaseModelSpec:
        if self._base_spec is None:
            if self._base_spec_loader is None:
                raise RuntimeError("ExpertPool needs a base model spec to validate adapters")
            self._base_spec = self._base_spec_loader()
        return self._base_spec

    def embed(self, texts: list[str]) -> np.ndarray:
        if self._embed is None:
            from moerge.models.embedder import get_embedder
            self._embed = get_embedder().encode
        return self._embed(texts)

    def on_change(self, listener: ChangeListener) -> None:
        """`listener(event, name)` on every change: this process's once committed, other processes' within
        `poll_s`. Events: "added", "updated", "removed" (an expert registered again elsewhere: both)."""
        self.changes.subscribe(listener)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes sharing this pool folder and, with PostgreSQL, across
        every process using its database. Re-entrant in one thread."""
        with self._thread_lock:
            if self._lock_depth:
                yield
                return
            with open(self.root / ".lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    with self.registry.exclusive():
                        self._lock_depth += 1
                        try:
                            yield
                        finally:
                            self._lock_depth -= 1
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _commit(self, blobs: dict[str, bytes | Path], write_row: Callable, event: str) -> dict[str, str]:
        """Stage + publish blobs, then run write_row(conn, digests) -> the card written, in one transaction,
        and record `event` for the listeners (`self.changes.dispatch()` tells them, after the lock).

        On any failure, the staging files and the blobs this call published are removed: under the
        pool lock no committed row can reference a blob that was absent before this call. A write
        that found no room raises StorageFullError (507)."""
        with self.locked():
            published: list[str] = []
            try:
                staged = {}
                for role, src in blobs.items():
                    staged[role] = (self.store.stage_file(src) if isinstance(src, Path)
                                    else self.store.stage_bytes(src))
                digests = {}
                for role, (digest, tmp) in staged.items():
                    if not self.store.has(digest):
                        published.append(digest)
                    self.store.publish(digest, tmp)
                    digests[role] = digest
                with self.registry.begin() as conn:
                    card = write_row(conn, digests)
                self.changes.record(event, card.name, card.to_row()["body"])
                return digests
            except BaseException as e:
                self.store.clear_staging()
                for digest in published:
                    # a remote store that fails here too leaves an unreferenced blob for the next sweep
                    with contextlib.suppress(ExpertError):
                        self.store.remove(digest)
                full = storage_full(e, self.root) if isinstance(e, OSError) else None
                if full is None:
                    raise
                raise full from e

    # -- reads ----------------------------------------------------------------------
    def list(self) -> list[ExpertCard]:
        return self.registry.list()

    def names(self) -> list[str]:
        return self.registry.names()

    def get(self, name: str) -> ExpertCard:
        card = self.registry.get(name)
        if card is None:
            raise UnknownExpertError(f"no expert named {name!r}: `moerge experts list` shows the pool")
        return card

    def artifact_bytes(self, card: ExpertCard, role: str) -> bytes:
        return self.store.read(card.artifacts[role])

    def artifact_tensors(self, card: ExpertCard, role: str) -> dict[str, torch.Tensor]:
        return st_load(self.artifact_bytes(card, role))

    def lora_weights(self, card: ExpertCard) -> dict[str, torch.Tensor]:
        return self.artifact_tensors(card, "adapter_weights")

    def adapter_dir(self, card: ExpertCard) -> Path:
        """A peft-loadable folder for a LoRA card (hard links into the store, made once)."""
        if card.kind != "lora":
            raise ExpertError(f"expert {card.name!r} is a {card.kind}, not a LoRA adapter")
        return self._linked_dir("adapters", card, (("adapter_weights", "adapter_model.safetensors"),
                                                   ("adapter_config", "adapter_config.json")))

    def esft_dir(self, card: ExpertCard) -> Path:
        """An ESFT adapter folder for an esft card (esft_config.json + esft_model.safetensors, hard links
        into the store, made once)."""
        if card.kind != "esft":
            raise ExpertError(f"expert {card.name!r} is a {card.kind}, not an ESFT adapter")
        from moerge.moe.esft import CONFIG_NAME, WEIGHTS_NAME
        return self._linked_dir("esft", card, (("esft_config", CONFIG_NAME), ("esft_weights", WEIGHTS_NAME)))

    def _linked_dir(self, under: str, card: ExpertCard, files: tuple[tuple[str, str], ...]) -> Path:
        """<root>/<under>/<key>/ with one hard link per (role, file name), published by one rename."""
        key = "".join(card.artifacts[role][:16] for role, _ in files)
        folder = self.root / under / key
        if not all((folder / fname).exists() for _, fname in files):
            tmp = self.root / under / f".{key}.{os.getpid()}.{threading.get_ident()}"
            tmp.mkdir(parents=True, exist_ok=True)
            for role, fname in files:
                target = tmp / fname
                if not target.exists():
                    os.link(self.store.path(card.artifacts[role]), target)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process made it first
                for p in tmp.iterdir():
                    p.unlink()
                tmp.rmdir()
        return folder

    # -- writes ---------------------------------------------------------------------
    def _card_blobs(self, card: ExpertCard) -> dict[str, bytes]:
        emb = self.embed([card.card_text() or card.name])
        blobs = {"card_embedding": tensors_to_bytes({"embedding": torch.from_numpy(emb[0])})}
        if card.examples:
            ex = self.embed(card.examples)
            blobs["example_embeddings"] = tensors_to_bytes({"embeddings": torch.from_numpy(ex)})
        return blobs

    def _ensure_free(self, name: str) -> None:
        if self.registry.get(name) is not None:
            raise NameTakenError(f"an expert named {name!r} already exists: choose another name "
                                 "or remove it first")

    def _insert(self, card: ExpertCard, blobs: dict[str, bytes | Path]) -> ExpertCard:
        def write_row(conn, digests):
            if self.registry.get(card.name, conn) is not None:
                raise NameTakenError(f"an expert named {card.name!r} already exists: choose another name")
            card.artifacts.update(digests)
            try:
                self.registry.insert(conn, card)
            except IntegrityError:
                raise NameTakenError(f"an expert named {card.name!r} already exists") from None
            return card

        self._commit(blobs, write_row, "added")
        self.changes.dispatch()
        return card

    def register_lora(self, folder: Path, name: str, description: str = "", *, tags: list[str] | None = None,
                      examples: list[str] | None = None, extra: dict | None = None,
                      extra_blobs: dict[str, bytes] | None = None,
                      answered_examples: list[dict] | None = None) -> ExpertCard:
        check_name(name)
        self._ensure_free(name)
        folder = Path(folder)
        adapter: LoraAdapter = load_lora(folder, self.base_spec, max_rank=self.max_rank,
                                         max_bytes=self.max_upload_bytes)
        card = ExpertCard(name=name, kind="lora", base_model=self.base_spec.model_id,
                          description=description, tags=list(tags or []), examples=list(examples or []),
                          answered_examples=_answered(answered_examples),
                          rank=adapter.rank, target_modules=adapter.target_modules, extra=dict(extra or {}))
        protos = arrow_prototypes(adapter.weights)
        blobs: dict[str, bytes | Path] = {
            "adapter_config": (folder / "adapter_config.json"),
            "adapter_weights": (folder / "adapter_model.safetensors"),
            "arrow": tensors_to_bytes(protos),
            **self._card_blobs(card),
            **(extra_blobs or {}),
        }
        return self._insert(card, blobs)

    def register_esft(self, folder: Path, name: str, description: str = "", *, tags: list[str] | None = None,
                      examples: list[str] | None = None, extra: dict | None = None) -> ExpertCard:
        """Register an ESFT adapter trained on the pool's current MoE base (validated in full first)."""
        from moerge.moe.base import require_moe
        from moerge.moe.esft import CONFIG_NAME, WEIGHTS_NAME, load_esft
        check_name(name)
        self._ensure_free(name)
        folder = Path(folder)
        base = require_moe(self.root)
        adapter = load_esft(folder, base, max_bytes=self.max_esft_bytes)
        summary = {"base_moe": base.version, "task": adapter.config.get("task", ""),
                   "layers": len(adapter.experts), "experts": adapter.n_experts,
                   "expert_map": {str(k): v for k, v in adapter.experts.items()}}
        card = ExpertCard(name=name, kind="esft", base_model=base.id, description=description,
                          tags=list(tags or []), examples=list(examples or []),
                          extra={**dict(extra or {}), "esft": summary})
        blobs: dict[str, bytes | Path] = {
            "esft_config": folder / CONFIG_NAME,
            "esft_weights": folder / WEIGHTS_NAME,
            **self._card_blobs(card),
        }
        return self._insert(card, blobs)

    def register_model(self, name: str, description: str = "", *, model: str | None = None,
                       api_base: str | None = None, api_key_env: str | None = None, path: Path | None = None,
                       tags: list[str] | None = None, examples: list[str] | None = None) -> ExpertCard:
        check_name(name)
        self._ensure_free(name)
        ref = validate_model_expert(model=model, api_base=api_base, api_key_env=api_key_env, path=path)
        card = ExpertCard(name=name, kind="model", base_model=ref.get("base_model") or "",
                          description=description, tags=list(tags or []), examples=list(examples or []),
                          model=ref.get("model"), api_base=ref.get("api_base"), api_key_env=api_key_env,
                          extra={"path": ref.get("path")} if ref.get("path") else {})
        blobs = {"model_ref": json.dumps(ref, sort_keys=True).encode(), **self._card_blobs(card)}
        return self._insert(card, blobs)

    def update(self, name: str, *, description: str | None = None, tags: list[str] | None = None,
               examples: list[str] | None = None, extra: dict | None = None,
               artifacts: dict[str, bytes] | None = None,
               answered_examples: list[dict] | None = None) -> ExpertCard:
        """Change metadata (re-embedding the card) or add artifacts such as a trained gate."""
        old = self.get(name)
        card = old.model_copy(deep=True)
        if answered_examples is not None:
            card.answered_examples = _answered(answered_examples)
        if description is not None:
            card.description = description
        if tags is not None:
            card.tags = list(tags)
        if examples is not None:
            card.examples = list(examples)
        if extra:
            card.extra.update(extra)
        blobs: dict[str, bytes | Path] = dict(artifacts or {})
        if (card.description, card.tags, card.examples) != (old.description, old.tags, old.examples):
            blobs.update(self._card_blobs(card))
            if not card.examples:
                card.artifacts.pop("example_embeddings", None)

        def write_row(conn, digests):
            if self.registry.get(name, conn) is None:
                raise UnknownExpertError(f"no expert named {name!r}")
            card.artifacts.update(digests)
            self.registry.replace(conn, card)
            return card

        self._commit(blobs, write_row, "updated")
        with self.locked():
            self.store.sweep(self.registry.referenced_digests())
        self.changes.dispatch()
        return card

    def remove(self, name: str) -> None:
        self.get(name)
        with self.locked():
            with self.registry.begin() as conn:
                self.registry.delete(conn, name)
            self.changes.record("removed", name, None)
            self.store.sweep(self.registry.referenced_digests())
        self.changes.dispatch()

    def close(self) -> None:
        """Stop looking for other processes' changes and close the registry's connections."""
        self.changes.close()
        self.registry.close()


def open_pool(settings=None, **kwargs) -> ExpertPool:
    """The pool the settings describe, validating adapters against the prepared base model."""
    from moerge.config import get_settings
    from moerge.experts.lora import base_spec_from_folder

    s = settings or get_settings()

    def loader() -> BaseModelSpec:
        from moerge.assets import ensure_base_model
        folder = ensure_base_model(s)
        return base_spec_from_folder(str(folder), s.base_model_id)

    return ExpertPool(s.pool_path, s.registry_url, base_spec_loader=loader, max_rank=s.max_lora_rank,
                      max_upload_bytes=s.max_upload_bytes, busy_timeout_s=s.registry_busy_timeout_s,
                      poll_s=s.pool_poll_s, store_url=s.pool_url, storage_options=s.pool_storage_options,
                      max_esft_bytes=s.max_esft_upload_bytes, **kwargs)

