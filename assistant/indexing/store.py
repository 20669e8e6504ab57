"""The versioned index store under `index/`.

Layout::

    index/
      CURRENT                  name of the serving version (replaced atomically)
      .lock                    held while a build runs
      versions/<version>/
        manifest.json          settings, embedder fingerprint, per-document hashes, file checksums
        dense.faiss            IndexIDMap2 over unit vectors, keyed by 63-bit chunk ids
        vectors.npy, ids.npy   the same vectors and ids, reused by incremental rebuilds
        chunks.sqlite          one row per chunk: id, text and citation metadata
        bm25/                  bm25s index; rows follow ids.npy

A build writes a new version beside the old one in a hidden folder, renames it into place, then
replaces CURRENT. A crash at any point leaves the previous version serving. The previous version is
kept for `bedside index rollback`; older ones are pruned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from assistant import __version__
from assistant.chunking import Chunk, Chunker, chunk_int_id
from assistant.corpus.document import Document
from assistant.errors import BedsideError, IndexStoreError
from assistant.fileio import (
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    fsync_dir,
    write_failure_kind,
)
from assistant.indexing.backends import FLAT_MAX_CHUNKS, build_faiss, choose_index_type, place_index
from assistant.indexing.lexical import bm25_tokenize, load_bm25, save_bm25

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
CHUNK_COLUMNS = (
    "int_id", "chunk_id", "doc_id", "position", "text", "title", "source", "section", "page", "date",
    "specialty", "issuer", "version",
)


@dataclass
class EmbedderInfo:
    """Identity of the embedder an index was built with; any difference forbids mixing vectors."""

    name: str
    fingerprint: str
    dimension: int
    max_seq_length: int
    normalize: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BuildSummary:
    version: str
    documents: int
    chunks: int
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    embedded_chunks: int = 0
    seconds: float = 0.0
    truncated_chunks: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"index {self.version}: {self.documents} documents ({self.added} added, {self.changed} changed, "
            f"{self.removed} removed, {self.unchanged} unchanged), {self.chunks} chunks "
            f"({self.embedded_chunks} embedded, {self.truncated_chunks} truncated), "
            f"{len(self.problems)} bad files or lines skipped, {self.seconds:.1f} s"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _artifact_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")


class LoadedIndex:
    """One verified index version, ready to search. Safe to share between threads."""

    def __init__(self, folder: Path, manifest: dict[str, Any], faiss_index: Any, device: str,
                 bm25: Any, bm25_ids: np.ndarray) -> None:
        self.folder = folder
        self.manifest = manifest
        self.faiss_index = faiss_index
        self.device = device
        self.bm25 = bm25
        self.bm25_ids = bm25_ids
        self._db = sqlite3.connect(f"file:{folder / 'chunks.sqlite'}?mode=ro", uri=True, check_same_thread=False)
        self._db_lock = threading.Lock()
        # memory-mapped, so exact cosine scores for any chunk cost one row read
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r", allow_pickle=False)
        self.row_of = {int(i): n for n, i in enumerate(bm25_ids)}

    def vectors_of(self, int_ids: list[int]) -> np.ndarray:
        return np.asarray(self.vectors[[self.row_of[int(i)] for i in int_ids]], dtype=np.float32)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def size(self) -> int:
        return int(self.manifest["chunks"])

    def chunks_by_int_id(self, int_ids: list[int]) -> dict[int, Chunk]:
        if not int_ids:
            return {}
        rows: list[tuple] = []
        with self._db_lock:
            for start in range(0, len(int_ids), 500):
                batch = [int(i) for i in int_ids[start:start + 500]]
                marks = ",".join("?" * len(batch))
                rows += self._db.execute(
                    f"SELECT {', '.join(CHUNK_COLUMNS)} FROM chunks WHERE int_id IN ({marks})", batch
                ).fetchall()
        return {row[0]: Chunk(*row[1:]) for row in rows}

    def chunks_of_documents(self, doc_ids: list[str]) -> list[Chunk]:
        with self._db_lock:
            rows = []
            for doc_id in doc_ids:
                rows += self._db.execute(
                    f"SELECT {', '.join(CHUNK_COLUMNS)} FROM chunks WHERE doc_id = ? ORDER BY position", (doc_id,)
                ).fetchall()
        return [Chunk(*row[1:]) for row in rows]

    def filtered_int_ids(self, since: str | None = None, specialty: str | None = None) -> np.ndarray:
        """Ids of chunks dated on or after `since` (ISO date) and of `specialty`; undated chunks fail `since`."""
        clauses, args = [], []
        if since:
            clauses.append("date >= ?")
            args.append(since)
        if specialty:
            clauses.append("specialty = ?")
            args.append(specialty)
        where = " AND ".join(clauses) or "1"
        with self._db_lock:
            rows = self._db.execute(f"SELECT int_id FROM chunks WHERE {where}", args).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def specialties(self) -> list[str]:
        with self._db_lock:
            rows = self._db.execute("SELECT DISTINCT specialty FROM chunks WHERE specialty IS NOT NULL").fetchall()
        return sorted(r[0] for r in rows)

    def close(self) -> None:
        self._db.close()


class IndexStore:
    """Build, verify, open, roll back and prune index versions under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    # reading

    def current_version(self) -> str | None:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        return name or None

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        """Return the manifest of `version`, or of the version `open` would serve when it is None.

        Without a version, an unreadable manifest of CURRENT falls back to the previous version's, as
        `open` does, so commands that read the manifest first agree with what is served.
        """
        if version is not None:
            return self._read_manifest_file(version)
        current = self.current_version()
        if current is None:
            raise IndexStoreError(
                f"no index found in {str(self.root)!r}; build one with `bedside index rebuild --index {self.root}`"
            )
        try:
            return self._read_manifest_file(current)
        except IndexStoreError as err:
            previous = self._previous_of(current)
            if previous is None:
                raise
            logger.error("%s; using the previous version %s instead", err, previous)
            return self._read_manifest_file(previous)

    def _read_manifest_file(self, version: str) -> dict[str, Any]:
        path = self.versions_dir / version / "manifest.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise IndexStoreError(f"index manifest {str(path)!r} is missing or unreadable: {err}") from err

    def verify(self, version: str) -> dict[str, Any]:
        """Check every artifact's checksum and the chunk counts; return the manifest or raise."""
        folder = self.versions_dir / version
        manifest = self.read_manifest(version)
        expected: dict[str, str] = manifest.get("files", {})
        present = {str(p.relative_to(folder)) for p in _artifact_files(folder)}
        if set(expected) != present:
            missing = sorted(set(expected) - present)
            extra = sorted(present - set(expected))
            raise IndexStoreError(f"index version {version} has missing files {missing} or unexpected files {extra}")
        for name, checksum in expected.items():
            if _sha256(folder / name) != checksum:
                raise IndexStoreError(f"index version {version}: {name} does not match its checksum (corrupt)")
        return manifest

    def open(self, embedder: EmbedderInfo | None = None, version: str | None = None) -> LoadedIndex:
        """Open the serving version after verifying it; fall back to the previous one if it is corrupt.

        An index built with another embedder is rejected outright: its vectors live in another space,
        so falling back would not help.
        """
        version = version or self.current_version()
        if version is None:
            raise IndexStoreError(
                f"no index found in {str(self.root)!r}; build one with `bedside index rebuild --index {self.root}`"
            )
        while True:
            try:
                manifest = self.verify(version)
                break
            except IndexStoreError as err:
                previous = self._previous_of(version)
                if previous is None:
                    raise IndexStoreError(
                        f"{err}; no previous version to fall back to: run `bedside index rebuild --full`"
                    ) from err
                logger.error("%s; serving the previous version %s instead", err, previous)
                version = previous
        if embedder is not None:
            check_embedder(manifest, embedder, self.root)
        return self._load(version, manifest)

    def _previous_of(self, version: str) -> str | None:
        """The version to serve when `version` is unusable; always an older one, so fallbacks end."""
        try:
            previous = self.read_manifest(version).get("previous_version")
        except IndexStoreError:
            # the manifest itself is gone: the newest older complete version is the fallback
            older = sorted(p.name for p in self.versions_dir.iterdir()
                           if p.is_dir() and not p.name.startswith(".") and p.name < version) \
                if self.versions_dir.is_dir() else []
            previous = older[-1] if older else None
        if previous and previous < version and (self.versions_dir / previous).is_dir():
            return previous
        return None

    def _load(self, version: str, manifest: dict[str, Any]) -> LoadedIndex:
        import faiss

        folder = self.versions_dir / version
        index = faiss.read_index(str(folder / "dense.faiss"))
        ids = np.load(folder / "ids.npy", allow_pickle=False)
        with sqlite3.connect(f"file:{folder / 'chunks.sqlite'}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        faiss_ids = faiss.vector_to_array(index.id_map) if index.ntotal else np.array([], dtype=np.int64)
        if not (index.ntotal == len(ids) == rows == manifest["chunks"]) or not np.array_equal(faiss_ids, ids):
            raise IndexStoreError(
                f"index version {version} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, {rows} "
                f"metadata rows, manifest says {manifest['chunks']}; run `bedside index rebuild --full`"
            )
        if hasattr(index.index, "hnsw"):
            faiss.downcast_index(index.index).hnsw.efSearch = manifest.get("hnsw_ef_search", 128)
        search_index, device = place_index(index)
        bm25 = load_bm25(folder / "bm25") if len(ids) else None
        logger.info("index %s opened: %d chunks, %s, FAISS %s", version, len(ids), manifest["index_type"], device)
        return LoadedIndex(folder, manifest, search_index, device, bm25, ids)

    # writing

    def rebuild(self, documents: list[Document], chunker: Chunker, embedder: Any, embedder_info: EmbedderInfo,
                settings: dict[str, Any], full: bool = False, progress: bool = False,
                problems: list[tuple[str, str]] | None = None, index_type: str = "auto") -> BuildSummary:
        """Build a new version from `documents`, reusing unchanged documents' vectors unless `full`."""
        start = time.perf_counter()
        with exclusive_lock(self.root / ".lock"):
            self._remove_stale_builds()
            # the build folder exists from the start, so a crash at any step leaves it behind as stale
            version, building = self._new_build_folder()
            try:
                previous = self._reusable_previous(embedder_info, chunker, full)
                old_docs: dict[str, Any] = previous.manifest["documents"] if previous else {}
                summary = BuildSummary(version="", documents=len(documents), chunks=0,
                                       problems=list(problems or []))

                # decide per document: reuse its chunks and vectors, or chunk and embed it again
                reuse_docs, fresh_docs = [], []
                for document in documents:
                    old = old_docs.get(document.doc_id)
                    if old and old["content_hash"] == document.content_hash:
                        reuse_docs.append(document)
                        summary.unchanged += 1
                    else:
                        fresh_docs.append(document)
                        summary.changed += 1 if old else 0
                        summary.added += 0 if old else 1
                current_ids = {d.doc_id for d in documents}
                summary.removed = sum(1 for doc_id in old_docs if doc_id not in current_ids)

                chunks: list[Chunk] = []
                vectors: list[np.ndarray] = []
                if reuse_docs:
                    reused = previous.chunks_of_documents([d.doc_id for d in reuse_docs])
                    chunks += reused
                    vectors.append(previous.vectors_of([c.int_id for c in reused]))
                from tqdm.auto import tqdm

                truncated_before = chunker.report.truncated
                fresh_chunks = [c for d in tqdm(fresh_docs, desc="chunking", unit="doc", disable=not progress)
                                for c in chunker.chunk_document(d)]
                if fresh_chunks:
                    vectors.append(embed_texts(embedder, [c.embedding_text for c in fresh_chunks], progress))
                chunks += fresh_chunks
                summary.embedded_chunks = len(fresh_chunks)
                # the chunker may be reused across rebuilds, so count only this build's truncations
                summary.truncated_chunks = chunker.report.truncated - truncated_before
                if previous:
                    previous.close()

                matrix = np.concatenate(vectors) if vectors else np.zeros((0, embedder_info.dimension),
                                                                          np.float32)
                doc_meta = {d.doc_id: {"content_hash": d.content_hash, "title": d.title, "source": d.source,
                                       "date": d.date, "version": d.version, "specialty": d.specialty}
                            for d in documents}
                summary.version = self._write_version(version, building, chunks, matrix, doc_meta,
                                                      embedder_info, chunker, settings, index_type, summary)
            except BaseException:
                # a failed build (full disk, interrupt) leaves no half-written folder behind
                shutil.rmtree(building, ignore_errors=True)
                raise
        summary.chunks = len(chunks)
        summary.seconds = time.perf_counter() - start
        logger.info(summary.line())
        return summary

    def remove_documents(self, doc_ids: list[str]) -> BuildSummary:
        """Write a new version without `doc_ids`; nothing is re-embedded."""
        start = time.perf_counter()
        with exclusive_lock(self.root / ".lock"):
            current = self.open()
            manifest = current.manifest
            unknown = [d for d in doc_ids if d not in manifest["documents"]]
            if unknown:
                current.close()
                raise IndexStoreError(f"document id(s) {unknown} are not in index {current.version}; "
                                      "`bedside index info --json` lists the indexed documents")
            keep = [d for d in manifest["documents"] if d not in set(doc_ids)]
            chunks = current.chunks_of_documents(keep)
            matrix = current.vectors_of([c.int_id for c in chunks]) if chunks else np.zeros(
                (0, manifest["embedder"]["dimension"]), np.float32)
            current.close()
            doc_meta = {d: manifest["documents"][d] for d in keep}
            summary = BuildSummary(version="", documents=len(keep), chunks=len(chunks), removed=len(doc_ids),
                                   unchanged=len(keep))
            self._remove_stale_builds()
            version, building = self._new_build_folder()
            try:
                summary.version = self._write_version(
                    version, building, chunks, matrix, doc_meta, EmbedderInfo(**manifest["embedder"]), None,
                    manifest["settings"],
                    manifest.get("index_type_setting", "auto"), summary, chunking=manifest["chunking"],
                )
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
        summary.seconds = time.perf_counter() - start
        logger.info(summary.line())
        return summary

    def rollback(self) -> str:
        """Serve the version before the current one again; returns its name."""
        with exclusive_lock(self.root / ".lock"):
            current = self.current_version()
            previous = self._previous_of(current) if current else None
            if previous is None:
                raise IndexStoreError(f"index in {str(self.root)!r} has no previous version to roll back to")
            self.verify(previous)
            atomic_write_text(self.root / "CURRENT", previous + "\n")
            logger.info("index rolled back from %s to %s", current, previous)
            return previous

    def _reusable_previous(self, embedder_info: EmbedderInfo, chunker: Chunker, full: bool) -> LoadedIndex | None:
        if full or self.current_version() is None:
            return None
        try:
            previous = self.open()
        except IndexStoreError as err:
            logger.warning("previous index not reusable (%s); embedding everything", err)
            return None
        same_embedder = previous.manifest["embedder"] == embedder_info.to_dict()
        same_chunking = previous.manifest["chunking"] == _chunking_settings(chunker)
        if not (same_embedder and same_chunking):
            logger.info("embedder or chunking settings changed since %s; embedding everything", previous.version)
            previous.close()
            return None
        return previous

    def _new_build_folder(self) -> tuple[str, Path]:
        """Name a new version and create its hidden build folder beside the serving versions."""
        # UTC time to the microsecond, so version names sort in build order
        version = dt.datetime.now(dt.timezone.utc).strftime("v%Y%m%dT%H%M%S%f") + "-" + secrets.token_hex(2)
        building = self.versions_dir / f".building-{version}"
        try:
            building.mkdir(parents=True)
        except OSError as err:
            raise self._write_failed(version, err) from err
        return version, building

    def _write_version(self, version: str, building: Path, chunks: list[Chunk], vectors: np.ndarray,
                       doc_meta: dict[str, Any], embedder_info: EmbedderInfo, chunker: Chunker | None,
                       settings: dict[str, Any], index_type_setting: str, summary: BuildSummary,
                       chunking: dict[str, Any] | None = None) -> str:
        import faiss

        # one order for every artifact: the ids array; the FAISS id map and BM25 rows follow it
        ids = np.array([c.int_id for c in chunks], dtype=np.int64)
        if len(set(ids.tolist())) != len(ids):
            raise IndexStoreError("two chunks share an id; the corpus holds duplicate documents under one id")
        index_type = choose_index_type(len(chunks), index_type_setting)
        dense = build_faiss(vectors, ids, index_type)
        try:
            np.save(building / "vectors.npy", vectors.astype(np.float32), allow_pickle=False)
            np.save(building / "ids.npy", ids, allow_pickle=False)
            # FAISS reports a failed write as RuntimeError, SQLite as sqlite3.Error
            faiss.write_index(dense, str(building / "dense.faiss"))
            _write_chunks_db(building / "chunks.sqlite", chunks)
            if chunks:
                save_bm25(building / "bm25", bm25_tokenize([c.embedding_text for c in chunks]))
        except (OSError, RuntimeError, sqlite3.Error) as err:
            raise self._write_failed(version, err) from err

        previous_version = self._healthy_version()
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "previous_version": previous_version,
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "bedside_version": __version__,
            "documents": doc_meta,
            "document_count": len(doc_meta),
            "chunks": len(chunks),
            "embedder": embedder_info.to_dict(),
            "chunking": chunking if chunking is not None else _chunking_settings(chunker),
            "index_type": index_type,
            "index_type_setting": index_type_setting,
            # the size rule behind an "auto" choice: flat up to this many chunks, HNSW above
            "flat_max_chunks": FLAT_MAX_CHUNKS,
            "hnsw_ef_search": 128,
            "bm25": {"library": "bm25s", "stemmer": "english (PyStemmer)", "stopwords": "english"},
            "settings": settings,
            "summary": {k: v for k, v in summary.__dict__.items() if k not in {"problems", "version"}},
            "skipped_files": [{"path": p, "reason": r} for p, r in summary.problems],
            "files": {str(p.relative_to(building)): _sha256(p) for p in _artifact_files(building)},
        }
        try:
            atomic_write_json(building / "manifest.json", manifest)
        except BedsideError as err:
            raise self._write_failed(version, err) from err
        fsync_dir(building)

        # switch: rename the finished folder into place, then point CURRENT at it
        final = self.versions_dir / version
        try:
            os.replace(building, final)
            fsync_dir(self.versions_dir)
            atomic_write_text(self.root / "CURRENT", version + "\n")
        except (OSError, BedsideError) as err:
            # CURRENT still names the old version, so the new folder would only take up space
            shutil.rmtree(final, ignore_errors=True)
            raise self._write_failed(version, err) from err
        self._prune(keep={version, previous_version})
        return version

    def _write_failed(self, version: str, err: BaseException) -> IndexStoreError:
        """Describe a failed write of a new version; the version CURRENT names keeps serving."""
        serving = self.current_version()
        kept = f"version {serving} still serves" if serving else "no version was serving before"
        kind = write_failure_kind(self.versions_dir, err)
        reason = {"no_space": "No space left on device"}.get(kind) or getattr(err, "strerror", None) or str(err)
        fix = {"no_space": "free disk space", "read_only": "choose a writable folder with --index"}.get(
            kind, "check free disk space and permissions")
        return IndexStoreError(
            f"writing index version {version} in {str(self.root)!r} failed ({reason}); {kept} and the "
            f"unfinished version was removed: {fix}, then rerun"
        )

    def _healthy_version(self) -> str | None:
        """The version `open` serves now: CURRENT when it verifies, else its fallback, else None.

        A new version records it as its previous version, so rollback and pruning never keep a
        corrupt version in place of the good one.
        """
        current = self.current_version()
        candidate = current
        while candidate is not None:
            try:
                self.verify(candidate)
                return candidate
            except IndexStoreError:
                candidate = self._previous_of(candidate)
        return None

    def _remove_stale_builds(self) -> None:
        # Called under the build lock, so any hidden build folder left is from a crashed build.
        if self.versions_dir.is_dir():
            for stale in self.versions_dir.glob(".building-*"):
                logger.info("removing unfinished build %s", stale.name)
                shutil.rmtree(stale, ignore_errors=True)

    def _prune(self, keep: set[str | None]) -> None:
        for folder in self.versions_dir.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def check_embedder(manifest: dict[str, Any], embedder: EmbedderInfo, root: Path) -> None:
    """Reject an index whose vectors came from another embedder, even one of the same dimension."""
    built = manifest["embedder"]
    if built["fingerprint"] != embedder.fingerprint or built["dimension"] != embedder.dimension:
        raise IndexStoreError(
            f"index in {str(root)!r} was built with embedder {built['name']!r} ({built['dimension']} dims, "
            f"{built['fingerprint'][:19]}) but the configured embedder is {embedder.name!r} "
            f"({embedder.dimension} dims, {embedder.fingerprint[:19]}); run `bedside index rebuild --full` "
            "with the configured embedder, or configure the one the index was built with"
        )


def _chunking_settings(chunker: Chunker | None) -> dict[str, Any]:
    if chunker is None:
        return {}
    return {"chunk_tokens": chunker.chunk_tokens, "chunk_overlap": chunker.chunk_overlap,
            "max_tokens": chunker.max_tokens, "tokenizer": type(chunker.tokenizer).__name__,
            "header": "title — section"}


def _write_chunks_db(path: Path, chunks: list[Chunk]) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(
            "CREATE TABLE chunks (int_id INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE NOT NULL, doc_id TEXT NOT NULL, "
            "position INTEGER, text TEXT NOT NULL, title TEXT, source TEXT, section TEXT, page INTEGER, "
            "date TEXT, specialty TEXT, issuer TEXT, version TEXT)"
        )
        db.execute("CREATE INDEX chunks_doc ON chunks (doc_id)")
        db.executemany(
            f"INSERT INTO chunks VALUES ({','.join('?' * len(CHUNK_COLUMNS))})",
            [(chunk_int_id(c.chunk_id), c.chunk_id, c.doc_id, c.position, c.text, c.title, c.source, c.section,
              c.page, c.date, c.specialty, c.issuer, c.version) for c in chunks],
        )
        db.commit()
    finally:
        db.close()


def embed_texts(embedder: Any, texts: list[str], progress: bool = False, batch_size: int = 32) -> np.ndarray:
    """Unit-normalised float32 embeddings, so inner product equals cosine similarity."""
    vectors = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                              show_progress_bar=progress, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32)
