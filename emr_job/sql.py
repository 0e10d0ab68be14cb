"""SQL over published results, locally: `python -m emr_job.sql --results DIR|s3://... "SELECT ..."`.

The tables are the ones Athena sees through the Glue Data Catalog -- features, pca, failures -- read by DuckDB
from the same Iceberg data files, deletes applied: a query written for one runs on the other. Only the columns
a query names are read from files without deletes (DuckDB pushes the projection into the Arrow dataset)."""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa
import pyarrow.dataset as ds

from emr_job import storage
from emr_job.store import TABLE_NAMES, Results, arrow_schema, live_files, read_live


def connect(root: str):
    """A DuckDB connection with one view per published table."""
    import duckdb

    results = Results(storage.normalize(root))
    if results.report is None:
        raise FileNotFoundError(f"no results at {results.root} (report.json not found)")
    con = duckdb.connect()
    for name in TABLE_NAMES:
        schema = arrow_schema(name)
        files = live_files(results.table(name))
        whole = [f.path for f in files if not len(f.deleted)]
        fs = storage.filesystem(whole[0])[0] if whole else None
        clean = ds.dataset([storage.filesystem(p)[1] for p in whole], schema=schema, format="parquet", filesystem=fs)
        with_deletes = [f for f in files if len(f.deleted)]  # few: compaction rewrites them within hours
        masked = read_live(with_deletes, schema.names).select(schema.names).cast(schema) if with_deletes else None
        con.register(f"_{name}_whole_files", clean)
        con.register(f"_{name}_masked_files", masked if masked is not None else schema.empty_table())
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_whole_files UNION ALL "
                    f"SELECT * FROM _{name}_masked_files")  # fmt: skip
    return con


def query(root: str, sql: str) -> pa.Table:
    return connect(root).sql(sql).to_arrow_table()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emr_job.sql", description=__doc__)
    parser.add_argument("--results", required=True, help="the job's --output: a folder or s3:// prefix")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a table")
    parser.add_argument("sql", help='e.g. "SELECT label, count(*) AS images FROM pca GROUP BY label"')
    args = parser.parse_args(argv)
    import duckdb

    try:
        relation = connect(args.results).sql(args.sql)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if relation is None:
        return 0
    if args.csv:
        relation.to_df().to_csv(sys.stdout, index=False)
    else:
        relation.show(max_rows=1000, max_width=200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
