"""Reading what a run published, as a user of the results would."""

from emr_job.store import Results


def rows(out, name: str) -> dict:
    """path -> row of a published table."""
    return {r["path"]: r for r in Results(str(out)).read(name).to_pylist()}


def published(out) -> dict:
    """The published report and, per table (and for the run's model.onnx), the run that wrote what is published."""
    results = Results(str(out))
    runs = {}
    for name in ("features", "pca", "failures"):
        table = results.table(name)
        runs[name] = table.current_snapshot().summary["run-id"] if table and table.current_snapshot() else None
    if results.report and results.report.get("model"):
        runs["model.onnx"] = onnx_model(out)["run_id"]
    return {"report": results.report, "runs": runs}


def onnx_model(out) -> dict:
    """The published model.onnx's metadata, and k as its graph declares it."""
    import json
    from pathlib import Path

    import onnx

    report = json.loads((Path(out) / "report.json").read_text())
    graph = onnx.load(str(Path(out) / report["model_onnx"]))
    [pca] = [o for o in graph.graph.output if o.name == "pca"]
    props = {p.key: p.value for p in graph.metadata_props}
    return {**props, "graph_k": pca.type.tensor_type.shape.dim[1].dim_value}


def encodings(key: str) -> list:
    """The ways a key can be written down: raw, form-encoded (S3 notifications), JSON-escaped."""
    import json
    from urllib.parse import quote, quote_plus

    return sorted({key, quote_plus(key, safe="/"), quote(key, safe="/"), json.dumps(key)[1:-1]})


def holds(data: bytes, key: str) -> bool:
    return any(form.encode() in data for form in encodings(key))


def files_holding(root, key: str) -> list:
    """Every file under root whose content holds the key; Parquet files are decoded first (they compress)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    found = []
    for path in Path(root).rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            data = "\n".join(str(v) for col in table.columns for v in col.to_pylist()).encode()
        if holds(data, key):
            found.append(path)
    return found
