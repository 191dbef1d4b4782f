"""Task and general data: readers (files and `datasets` objects), example formats, collation."""

from .formats import Example, detect_shape, encode_record, encode_records
from .readers import DataError, Record, read_records

__all__ = ["DataError", "Example", "Record", "detect_shape", "encode_record", "encode_records", "read_records"]
