"""Searching with QINCo codes, one module per concern:

    index        IVF-RQ indexes for an IVF-QINCo model: files, checks, training, adding codes
    index_files  reading index files whose lists may be on disk (.faissindex + .ivfdata)
    ondisk       building at scale: codes added in bounded chunks, lists on disk, shards merged
    rerank       QINCo re-ranking of a shortlist (decode, exact distances, top k)
    sweep        the operating-point sweep (nprobe x efSearch x nshort) of an IVF index
    two_stage    flat two-stage search: AQ shortlist over the database, QINCo re-ranking
    qinco_index  QincoIndex, an IVF-QINCo index with faiss's interface
    aq           least-squares AQ codebooks fitted to QINCo codes (the shortlist's decoder)
    pairwise_stage  the pairwise decoder of an IVF model as the middle search stage
    provenance   which model made an index's codes: fingerprints, metadata files, the decode check
    report       the one results schema: its file, table, Pareto front and plot
    jax_engine   a JAX search engine for the same faiss indexes (batched, jitted, any device)

Results are dicts of the schema in `qinco_jax.search.report`.
"""

__all__ = ["QincoIndex"]


def __getattr__(name):
    # Imported on use, so that faiss-free parts (jax_engine on a GPU machine without
    # faiss) import without it.
    if name == "QincoIndex":
        from qinco_jax.search.qinco_index import QincoIndex

        return QincoIndex
    raise AttributeError(f"module 'qinco_jax.search' has no attribute {name!r}")
