"""Collection indexing: incremental, crash-safe indexes of image folders, searchable by text and image."""

from duomo.index.core import ImageIndex, SearchHit, model_id
from duomo.index.errors import IndexBusyError, IndexCorruptError, ModelMismatchError, QueryError
from duomo.index.files import IMAGE_EXTENSIONS, default_index_dir
from duomo.index.indexer import IndexReport
from duomo.index.query import QueryTerm, parse_query

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageIndex",
    "IndexBusyError",
    "IndexCorruptError",
    "IndexReport",
    "ModelMismatchError",
    "QueryError",
    "QueryTerm",
    "SearchHit",
    "default_index_dir",
    "model_id",
    "parse_query",
]
