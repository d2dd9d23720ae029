"""Searching with QINCo codes, one module per concern:

    index        IVF-RQ indexes for an IVF-QINCo model: files, checks, training, adding codes
    rerank       QINCo re-ranking of a shortlist (decode, exact distances, top k)
    sweep        the operating-point sweep (nprobe x efSearch x nshort) of an IVF index
    two_stage    flat two-stage search: AQ shortlist over the database, QINCo re-ranking
    qinco_index  QincoIndex, an IVF-QINCo index with faiss's interface
    aq           least-squares AQ codebooks fitted to QINCo codes (the shortlist's decoder)
    pairwise_stage  the pairwise decoder of an IVF model as the middle search stage
    provenance   which model made an index's codes: fingerprints, metadata files, the decode check
    report       the one results schema: its file, table, Pareto front and plot

Results are dicts of the schema in `qinco_jax.search.report`.
"""

from qinco_jax.search.qinco_index import QincoIndex

__all__ = ["QincoIndex"]
