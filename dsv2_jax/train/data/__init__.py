"""Training and evaluation data for ``dsv2 train``.

A data SPEC names a corpus (see ``docs/data.md`` for the full syntax)::

    stdlib                                  built-in: byte-level Python stdlib sources
    text:GLOB,tokenizer=PATH|bytes          one document per .txt file
    jsonl:GLOB,tokenizer=PATH|bytes[,field=text]   one document per JSON line
    npy:GLOB[,sep=ID]                       pre-tokenised 1-D integer arrays

    common options: holdout=FRACTION (default 0.02), eval=GLOB

Pipeline (all in-process, all grain, all checkpointable)::

    files (sorted) -> held-out split -> per-process shard -> shuffle(seed) -> repeat
      -> lazy per-file load + tokenise (grain MapDataset.map_with_index)
      -> cut documents into pieces of <= seq_len tokens, seeded order within the file
      -> mix pieces of up to 16 open files (seeded; state = a few ints)
      -> grain FirstFitPackIterDataset into [seq_len] rows (pieces never split)
      -> batch -> dict of int32 numpy arrays

Targets are computed per document before packing, so a target is always the next
token of the same document; the last token of every document has ``loss_mask`` 0.

The package, one idea per file: ``spec`` (the SPEC string), ``corpus`` (files, the
held-out split, tokenising, documents cut into pieces), ``mixer`` (pieces of several open
files interleaved, a grain dataset with a few integers of state), ``pipeline`` (epoch
order, packing, batching: ``make_train_iter`` / ``make_eval_iter``).
"""

from dsv2_jax.train.data.pipeline import BATCH_KEYS, make_eval_iter, make_train_iter
from dsv2_jax.train.data.spec import DataSpec, parse_spec

__all__ = [
    "DataSpec",
    "parse_spec",
    "make_train_iter",
    "make_eval_iter",
    "BATCH_KEYS",
]
