"""Encoding to embedding memmaps and exact inner-product search, under the module name of the original code
(DRhard's retrieve_utils.py), so that ``import retrieve_utils`` keeps working.  Each concept has its module:

* ``embedding_memmap`` — the embedding memmap file and its manifest (format), :func:`open_embeddings` (checked
  against its manifest and the corpus it covers, :func:`corpus_rows`), reading rows in blocks (numpy only);
* ``exact_search`` — exact inner-product top-k (:class:`FlatIPIndex`, :func:`exact_search`,
  :func:`streamed_search`), the search-result format, faiss GPU selection, the memory budget, rank files
  (:func:`write_rank_file`, :func:`rank_queries`) and the search options of the drivers (numpy + faiss, no
  torch);
* ``corpus_encoding`` — :func:`encode_to_memmap` (length-sorted, resumable, reuse policy) and the encoding pieces
  of the drivers (:func:`load_encoder`, :func:`encode_split`, :func:`encode_queries_and_corpus`,
  :func:`inference_device`, the encoding and inference options);
* ``training_index`` — ADORE's training index (:class:`TrainingIndex`, :class:`TensorIPIndex`,
  :func:`build_training_index`).

This module only re-exports the names that the scripts, tests and benchmarks use.
"""
# Not in alphabetical order: faiss (exact_search) is imported before torch (JPQ PR #2: the other order failed on
# some machines).
from embedding_memmap import MANIFEST_FORMAT, corpus_rows, manifest_path, open_embeddings
from exact_search import (FlatIPIndex, add_search_args, exact_search, faiss_gpu_count, memory_budget_bytes,
                          rank_queries, resolve_faiss_gpus, streamed_search, write_rank_file)
from corpus_encoding import (add_encoding_args, add_inference_args, add_query_and_corpus_args,
                             encode_queries_and_corpus, encode_split, encode_to_memmap, inference_device, load_encoder)
from training_index import INDEX_BACKENDS, SEARCH_PRECISIONS, TensorIPIndex, TrainingIndex, build_training_index

__all__ = [
    "MANIFEST_FORMAT", "corpus_rows", "manifest_path", "open_embeddings",
    "FlatIPIndex", "add_search_args", "exact_search", "faiss_gpu_count", "memory_budget_bytes",
    "rank_queries", "resolve_faiss_gpus", "streamed_search", "write_rank_file",
    "add_encoding_args", "add_inference_args", "add_query_and_corpus_args", "encode_queries_and_corpus",
    "encode_split", "encode_to_memmap", "inference_device", "load_encoder",
    "INDEX_BACKENDS", "SEARCH_PRECISIONS", "TensorIPIndex", "TrainingIndex", "build_training_index",
]
