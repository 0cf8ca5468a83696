"""Encoding to embedding memmaps and exact inner-product search, under the module name of the original code
(DRhard's retrieve_utils.py), so that ``import retrieve_utils`` keeps working.  Each concept has its module:

* ``embedding_memmap`` — the embedding memmap file and its manifest (format), :func:`open_embeddings` (checked
  against its manifest and the corpus it covers, :func:`corpus_rows`), reading rows in blocks (numpy only);
* ``exact_search`` — exact inner-product top-k (:class:`FlatIPIndex`, :func:`exact_search`,
  :func:`streamed_search`), the search-result format, faiss GPU selection, the memory budget, rank files
  (:func:`write_rank_file`) and the search options of the drivers (numpy + faiss, no torch);
* ``encoding_plan`` — the batches and shards of an encoding (numpy only);
* ``corpus_encoding`` — :func:`encode_to_memmap` (length-sorted, resumable, sharded, reuse policy);
* ``training_index`` — ADORE's training index (:class:`TrainingIndex`, :class:`TensorIPIndex`,
  :func:`build_training_index`);
* ``inference_pipeline`` — the inference drivers' shared steps: flags, :func:`load_encoder`, process placement
  (:func:`resolve_placement`: one process, torchrun ranks or ``--shard_id`` jobs), :func:`encode_split`,
  :func:`encode_queries_and_corpus`, :func:`rank_queries` (sharded over torchrun's ranks).

This module only re-exports the names that the scripts, tests and benchmarks use.
"""
# Not in alphabetical order: faiss (exact_search) is imported before torch (JPQ PR #2: the other order failed on
# some machines).
from embedding_memmap import MANIFEST_FORMAT, corpus_rows, manifest_path, open_embeddings
from exact_search import (FlatIPIndex, add_search_args, exact_search, faiss_gpu_count, memory_budget_bytes,
                          resolve_faiss_gpus, streamed_search, write_rank_file)
from corpus_encoding import encode_to_memmap, shard_path
from training_index import INDEX_BACKENDS, TensorIPIndex, TrainingIndex, build_training_index
from inference_pipeline import (Placement, add_encoding_args, add_inference_args, add_query_and_corpus_args,
                                batch_tokens_for, encode_queries_and_corpus, encode_split, inference_device,
                                load_encoder, rank_queries, resolve_placement)

__all__ = [
    "MANIFEST_FORMAT", "corpus_rows", "manifest_path", "open_embeddings",
    "FlatIPIndex", "add_search_args", "exact_search", "faiss_gpu_count", "memory_budget_bytes",
    "resolve_faiss_gpus", "streamed_search", "write_rank_file", "encode_to_memmap", "shard_path",
    "INDEX_BACKENDS", "TensorIPIndex", "TrainingIndex", "build_training_index",
    "Placement", "batch_tokens_for", "add_encoding_args", "add_inference_args", "add_query_and_corpus_args",
    "encode_queries_and_corpus", "encode_split", "inference_device", "load_encoder", "rank_queries",
    "resolve_placement",
]
