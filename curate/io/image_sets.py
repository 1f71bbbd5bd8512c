"""Sets of images given by the user: an evaluation set to decontaminate against, the
reference images of ``datacomp_image``.

A set is a folder of image files, a Parquet file of images (a name or uid column
and the bytes), or a Parquet file of vectors already made; a relative path is
looked up beside the run's input first.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError
from curate.io import images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: A set's image column: ``image``, or one a download's image shards have.
IMAGE_COLUMNS = ("image", *images.IMAGE_COLUMNS)
VECTOR_COLUMNS = ("image_embedding", "embedding")


def find_beside_input(eval_set: str, input_path: Path | None) -> Path:
    """A set's path; a relative one is looked up beside the run's input first."""
    path = Path(eval_set).expanduser()
    if not path.is_absolute() and input_path is not None:
        base = Path(input_path)
        beside = (base if base.is_dir() else base.parent) / path
        if beside.exists():
            return beside
    if not path.exists():
        raise ConfigError(f"{eval_set!r}: no such file or folder")
    return path


def read_image_set(path: Path) -> pa.Table:
    """(name, image bytes) or (name, vector): images of a folder, or a Parquet file's rows."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ConfigError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        names = [str(p.relative_to(path)) for p in files]
        return pa.table({"name": names, "image": [p.read_bytes() for p in files]})
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{path}: not a folder or a readable Parquet file: {exc}") from exc
    column = next((c for c in (*VECTOR_COLUMNS, *IMAGE_COLUMNS) if c in table.column_names), None)
    if column is None:
        wanted = ", ".join((*VECTOR_COLUMNS, *IMAGE_COLUMNS))
        raise ConfigError(f"{path}: needs one of the columns {wanted}")
    if column in IMAGE_COLUMNS and pa.types.is_struct(table[column].type):
        table = table.set_column(  # Hugging Face datasets' Image feature: {bytes, path}
            table.schema.get_field_index(column), column, pc.struct_field(table[column], "bytes")
        )
    if column in VECTOR_COLUMNS:
        table = table.set_column(
            table.schema.get_field_index(column), column, _fixed_size(table[column], path)
        )
    named = next((c for c in ("uid", "path", "name") if c in table.column_names), None)
    names = table[named].cast(pa.string()) if named else pa.array(map(str, range(len(table))))
    return pa.table({"name": names, column: table[column]})


def _fixed_size(vectors: pa.ChunkedArray, path: Path) -> pa.ChunkedArray:
    """Vectors as fixed_size_list (a plain list column is accepted if all rows are as long)."""
    kind = vectors.type
    if pa.types.is_fixed_size_list(kind):
        return vectors
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise ConfigError(f"{path}: vectors of type {kind}; expected lists of floats")
    lengths = pc.unique(pc.list_value_length(vectors).drop_null()).to_pylist()
    if len(lengths) != 1:
        raise ConfigError(f"{path}: vectors of different lengths {sorted(lengths)[:5]}")
    return vectors.cast(pa.list_(kind.value_type, lengths[0]))
