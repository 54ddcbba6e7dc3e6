"""The data contract: what a shard row is, and how other layouts map onto it.

A shard row is ``key`` (unique string), ``image`` (encoded image bytes: JPEG,
PNG, WebP, ... any format PIL decodes), ``caption`` (string, may be empty when
``label`` is set) and ``label`` (int, optional). img2dataset writes
``key``/``jpg``/``txt`` (and ``cls``), so a :class:`ColumnMapping` renames
those onto the contract instead of asking users to rewrite terabytes of shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

KEY, IMAGE, CAPTION, LABEL = "key", "image", "caption", "label"

SHARD_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field(CAPTION, pa.string()),
        pa.field(LABEL, pa.int64()),
    ]
)

# The prompts a class name becomes text through, where a dataset's metadata.json
# names none ("templates"): a small ensemble, as in CLIP's zero-shot recipe;
# averaging smooths the quirks of any single phrasing.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of a {}.",
)

# What the score job writes to scores/: one row per scored input row (status
# "ok", error empty), with the dense ``index`` that is its training sample id.
# A rejected input row is in rejects/ instead, with its reason: each
# input row is in exactly one of the two.
SCORES_SCHEMA = pa.schema(
    [
        pa.field(KEY, pa.string()),
        pa.field("index", pa.int64()),
        pa.field("clip_score", pa.float32()),
        pa.field("clip_margin", pa.float32()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema([pa.field(KEY, pa.string()), pa.field("reason", pa.string())])

# What a reader gives (:func:`to_contract`): a shard row, then the source label, as text, of a row
# whose label is not an integer ("cat", 2.5, an empty ``.cls`` member; null for every other row).
# One bad label would otherwise fail the whole read; the row checks reject that row with a reason.
BAD_LABEL = "bad_label"
READ_SCHEMA = pa.schema([*SHARD_SCHEMA, pa.field(BAD_LABEL, pa.string())])


class SchemaError(ValueError):
    """A table cannot be mapped onto the data contract."""


@dataclass(frozen=True)
class ColumnMapping:
    """Source column names for each contract column.

    Attributes:
        key: column holding the unique sample key.
        image: column holding encoded image bytes.
        caption: column holding the text; optional in the source.
        label: column holding an integer class; optional in the source.
    """

    key: str = KEY
    image: str = IMAGE
    caption: str = CAPTION
    label: str = LABEL
    # The contract columns the user's spec named (not a preset's, not a default): a source that holds
    # none of them is a typo, not a dataset without captions or labels (pipeline.data.shards.check_shards).
    named: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, spec: str) -> "ColumnMapping":
        """A preset name (``mmdp``, ``img2dataset``) or ``image=jpg,caption=txt,...``."""
        if spec in MAPPINGS:
            return MAPPINGS[spec]
        fields = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, source = part.partition("=")
            if not sep or name not in (KEY, IMAGE, CAPTION, LABEL) or not source:
                raise SchemaError(
                    f"bad column mapping {part!r} in {spec!r}: use a preset "
                    f"({', '.join(MAPPINGS)}) or contract=source pairs, e.g. image=jpg,caption=txt"
                )
            fields[name] = source
        return cls(**fields, named=tuple(fields))


MAPPINGS = {
    "mmdp": ColumnMapping(),
    # img2dataset's parquet/webdataset output; ``cls`` exists when labels were kept.
    "img2dataset": ColumnMapping(image="jpg", caption="txt", label="cls"),
}


def text_key(name: str) -> str:
    """A tar member's name as text Arrow can store: Python reads a name's bytes that are not UTF-8 as lone
    surrogates, which Arrow refuses; they are escaped instead (``caf\\xe9.jpg``), as the bytes of a parquet
    key column are (:func:`to_contract`)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def has_caption(value) -> bool:
    """Whether a caption cell holds text: blank text is no caption (a label's prompt stands in where there is one)."""
    return isinstance(value, str) and bool(value.strip())


def to_contract(table: pa.Table, mapping: ColumnMapping = ColumnMapping()) -> pa.Table:
    """Rename and cast ``table`` into :data:`READ_SCHEMA` (:data:`SHARD_SCHEMA`, then :data:`BAD_LABEL`).

    Missing optional columns (caption, label) become nulls; a missing key or
    image column is an error naming it, since no row could be scored without.
    A label that is not an integer is that row's null label, its text in
    :data:`BAD_LABEL`; the other rows keep theirs.

    Raises:
        SchemaError: a required column is missing or cannot be cast (a label column only by its type).
    """
    columns, bad_labels = [], pa.nulls(table.num_rows, pa.string())
    for field, source in zip(SHARD_SCHEMA, (mapping.key, mapping.image, mapping.caption, mapping.label)):
        if source in table.column_names:
            column = table.column(source)
            if field.name == LABEL and pa.types.is_string(column.type):
                # img2dataset's .cls members arrive as text ("3\n").
                column = pc.utf8_trim_whitespace(column)
            if field.name == LABEL and pa.types.is_floating(column.type):
                # NaN is how pandas writes a missing value.
                column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
            if field.name == IMAGE and pa.types.is_string(column.type):
                column = column.cast(pa.binary())
            if field.name == CAPTION and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                # Text stored as bytes may not be UTF-8; replace what is not,
                # rather than fail the whole shard or lose the row.
                column = pa.array([None if v is None else v.decode("utf-8", errors="replace")
                                   for v in column.to_pylist()], pa.string())
            try:
                column = column.cast(field.type)
            except pa.ArrowInvalid as exc:  # a value that does not cast
                if field.name == KEY and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                    # Keys as bytes that are not all UTF-8: the bytes that are not, escaped (b"caf\xe9" reads as
                    # "caf\\xe9"), the same in every job that reads them, rather than fail the whole shard.
                    column = pa.array([None if v is None else v.decode("utf-8", errors="backslashreplace")
                                       for v in column.to_pylist()], pa.string())
                elif field.name != LABEL:
                    raise _cast_error(source, field, exc) from exc
                else:
                    column, bad_labels = _labels_by_row(column)
            except pa.ArrowNotImplementedError as exc:  # a type that does not
                raise _cast_error(source, field, exc) from exc
        elif field.name in (KEY, IMAGE):
            raise SchemaError(
                f"missing column {source!r} (the {field.name} column); found {table.column_names}. "
                "Pass a column mapping, e.g. --columns img2dataset or --columns image=jpg,caption=txt"
            )
        else:
            column = pa.nulls(table.num_rows, field.type)
        columns.append(column)
    return pa.Table.from_arrays([*columns, bad_labels], schema=READ_SCHEMA)


def _cast_error(source: str, field: pa.Field, exc: Exception) -> SchemaError:
    return SchemaError(f"column {source!r} cannot be read as {field.name} ({field.type}): {exc}")


def _labels_by_row(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """``column`` cast value by value: the int64 labels (null where a value is not an integer), and the
    text of each value that is not (null elsewhere). Only where the whole column's cast failed: it is slow."""
    labels, bad = [], []
    for i, value in enumerate(column.to_pylist()):
        try:
            labels.append(column.slice(i, 1).cast(pa.int64())[0].as_py())
            bad.append(None)
        except pa.ArrowInvalid:
            labels.append(None)
            bad.append(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value))
    return pa.array(labels, pa.int64()), pa.array(bad, pa.string())
