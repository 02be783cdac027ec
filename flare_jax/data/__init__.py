"""Training data: corpus sources, tokenization with chat templates, packing and batching."""

from flare_jax.data.pipeline import DataConfig, build_dataset
from flare_jax.data.records import Record, RecordError, parse_record
from flare_jax.data.sources import corpus, open_source
from flare_jax.data.tokenize import DocumentTokenizer

__all__ = [
    "DataConfig",
    "DocumentTokenizer",
    "Record",
    "RecordError",
    "build_dataset",
    "corpus",
    "open_source",
    "parse_record",
]
