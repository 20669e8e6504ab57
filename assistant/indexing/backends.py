"""FAISS index construction, choice of index type by size, and GPU placement."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Flat search is exact and costs nothing to build, while an HNSW build is repeated on every rebuild
# (FAISS cannot remove vectors from an HNSW graph). So flat stays while its scan is small beside the
# query embedding, about 21 ms. benchmarks/retrieval_scale.py, one query at a time on a loaded 2-core
# CPU: flat took 2.4-6.2 ms at 50k chunks and 8.8-12.8 ms at 100k; HNSW about 0.2 ms at both, with
# recall@10 1.000 against flat, after builds of 12-15 s (50k) and 34-36 s (100k).
FLAT_MAX_CHUNKS = 50_000
HNSW_M = 32
HNSW_EF_SEARCH = 128


def choose_index_type(n_chunks: int, requested: str = "auto") -> str:
    if requested in {"flat", "hnsw"}:
        return requested
    return "flat" if n_chunks <= FLAT_MAX_CHUNKS else "hnsw"


def build_faiss(vectors: np.ndarray, ids: np.ndarray, index_type: str) -> Any:
    """Inner-product index over unit vectors (so scores are cosine similarities), keyed by explicit ids."""
    import faiss

    dimension = vectors.shape[1]
    if index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(dimension, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        inner = faiss.IndexFlatIP(dimension)
    # IndexIDMap2 stores our 63-bit chunk ids, so a vector can never be read under a row position.
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def place_index(index: Any) -> tuple[Any, str]:
    """Move a flat index to every visible GPU when faiss has GPU support; otherwise keep it on CPU.

    Returns the index to search and a description for the log and the manifest.
    """
    import faiss

    gpu_count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "StandardGpuResources"):
        logger.info("FAISS on CPU: this faiss build has no GPU support (install the `gpu` extra for faiss-gpu)")
        return index, "cpu"
    if gpu_count == 0:
        logger.info("FAISS on CPU: faiss has GPU support but no GPU is visible")
        return index, "cpu"
    try:
        options = faiss.GpuMultipleClonerOptions()
        # Shard across GPUs so a large index splits its memory; one GPU holds it whole.
        options.shard = gpu_count > 1
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as err:
        logger.warning("FAISS on CPU: moving the index to %d GPU(s) failed (%s)", gpu_count, err)
        return index, "cpu"
    logger.info("FAISS on GPU: %d GPU(s), %s", gpu_count, "sharded" if gpu_count > 1 else "single")
    return gpu_index, f"gpu x{gpu_count}"
