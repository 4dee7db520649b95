"""The sweep table: its schema and its files (.parquet or .csv), read with the sweep's types, written atomically.

One row per (size, method, k, subset, domain):

    size  n_params_b  pool_size  method  method_params  design  seed  eval_examples
    k  subset  domain  in_domain  ce  tokens

`n_params_b` is N in billions of parameters, `pool_size` the number of experts M of that size, `subset` the
subset's expert (domain) names joined by "+", `in_domain` whether the row's domain has its expert in the subset.
The macro cross-domain CE of a subset (the mean over its domains) is not stored: it is computed when fitting,
so the table holds measurements only.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from merging.errors import ConfigError

SCHEMA = pa.schema([
    ("size", pa.string()), ("n_params_b", pa.float64()), ("pool_size", pa.int64()), ("method", pa.string()),
    ("method_params", pa.string()), ("design", pa.string()), ("seed", pa.int64()), ("eval_examples", pa.int64()),
    ("k", pa.int64()), ("subset", pa.string()), ("domain", pa.string()), ("in_domain", pa.bool_()),
    ("ce", pa.float64()), ("tokens", pa.int64()),
])
COLUMNS = tuple(SCHEMA.names)
TABLE_SUFFIXES = (".parquet", ".csv")
SUBSET_SEPARATOR = "+"

Row = dict[str, Any]


def table_format(path: Path) -> str:
    if path.suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"{path}: a sweep table is .parquet or .csv; name the file with one of those suffixes")
    return path.suffix[1:]


def read_table(path: str | Path, required: tuple[str, ...] = COLUMNS) -> dict[str, list]:
    """A sweep table as {column: values}; known columns get the sweep's types, a missing one is refused."""
    path = Path(path)
    kind = table_format(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep table; run mergeplan sweep first")
    try:
        if kind == "csv":
            options = pa_csv.ConvertOptions(column_types={field.name: field.type for field in SCHEMA})
            table = pa_csv.read_csv(path, convert_options=options)
        else:
            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: cannot be read as {kind} ({str(exc).splitlines()[0]})") from exc
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise ConfigError(f"{path}: column {missing[0]!r} is missing (needed: {', '.join(required)}); "
                          "pass a table written by mergeplan sweep")
    columns = {}
    for name in table.column_names:
        values = table.column(name)
        if name in SCHEMA.names:
            try:
                values = values.cast(SCHEMA.field(name).type)
            except pa.ArrowException as exc:
                raise ConfigError(f"{path}: column {name!r} cannot be read as {SCHEMA.field(name).type} "
                                  f"({str(exc).splitlines()[0]})") from exc
        columns[name] = values.to_pylist()
    if "ce" in columns:  # CSV reads NaN back as null
        columns["ce"] = [float("nan") if value is None else value for value in columns["ce"]]
    return columns


def write_table(rows: list[Row], path: str | Path) -> None:
    """Write rows atomically: into a hidden sibling file, then renamed over `path`."""
    path = Path(path)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if table_format(path) == "csv":
            pa_csv.write_csv(table, staging)
        else:
            pq.write_table(table, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def rows_by_group(columns: dict[str, list]) -> dict[tuple[str, str, str], list[Row]]:
    """The rows of a table read by read_table, by (size, method, subset), in table order."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for values in zip(*(columns[name] for name in COLUMNS), strict=True):
        row = dict(zip(COLUMNS, values, strict=True))
        groups.setdefault((row["size"], row["method"], row["subset"]), []).append(row)
    return groups
