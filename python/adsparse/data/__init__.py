"""Streams of mini-batches for online training: the synthetic default and Criteo TSV files."""

from adsparse.data.base import Batch, Stream
from adsparse.data.criteo import CriteoStream, hash_category
from adsparse.data.synthetic import CRITEO_LIKE_SIZES, DRIFTS, SyntheticCTRStream

__all__ = [
    "CRITEO_LIKE_SIZES",
    "DRIFTS",
    "Batch",
    "CriteoStream",
    "Stream",
    "SyntheticCTRStream",
    "hash_category",
]
