"""The published tables in the Glue Data Catalog, for Athena, EMR and Redshift Spectrum.

Glue is a projection of report.json, never the commit point (emr_job/store.py): after each swap, and at
every run (a no-change run repairs a sync that failed), each Glue table is pointed at the metadata file
report.json names, in the layout of Iceberg's own Glue catalog (what Athena reads). A sync only moves a
table forward: metadata files are numbered along the published chain, so a late sync of an older run
never replaces a newer one, and Glue's VersionId makes two concurrent syncs take turns."""

from __future__ import annotations

import re
from typing import Optional

from emr_job.store import TABLE_NAMES, Results

GLUE_DATABASE = re.compile(r"^[a-z0-9_]{1,255}$")  # Athena reads lower-case names with underscores only
_VERSION = re.compile(r"/(\d+)-[^/]*\.metadata\.json$")
ATTEMPTS = 3


class CatalogError(RuntimeError):
    """The Glue tables could not be brought up to date (the results themselves are published)."""


def _version(metadata_location: Optional[str]) -> int:
    match = _VERSION.search(metadata_location or "")
    return int(match.group(1)) if match else -1


def sync_glue(output: str, database: str, glue=None) -> dict:
    """Point each Glue table of `database` at the published metadata; returns table -> what was done."""
    import boto3

    if not GLUE_DATABASE.match(database):
        raise CatalogError(f"--glue-database {database!r}: use lower-case letters, digits and underscores")
    glue = glue or boto3.client("glue")
    for _ in range(ATTEMPTS):
        results = Results(output)  # re-read: another run may have published since
        try:
            return {n: _sync_table(glue, database, n, results) for n in TABLE_NAMES if results.metadata_location(n)}
        except glue.exceptions.ConcurrentModificationException:
            continue  # another sync moved a table meanwhile: look again
    raise CatalogError(f"the Glue tables of {database} kept changing under {ATTEMPTS} attempts")


def _sync_table(glue, database: str, name: str, results: Results) -> str:
    from emr_job.iceberg import glue_table_input

    location = results.metadata_location(name)
    try:
        current = glue.get_table(DatabaseName=database, Name=name)["Table"]
    except glue.exceptions.EntityNotFoundException:
        current = None
    previous = (current or {}).get("Parameters", {}).get("metadata_location")
    if previous == location:
        return "current"
    if current and _version(previous) > _version(location):
        return "newer in Glue"  # a later run synced first
    table_input = glue_table_input(name, location, results.table(name).metadata, current, previous)
    if current is None:
        try:
            glue.create_table(DatabaseName=database, TableInput=table_input)
        except glue.exceptions.AlreadyExistsException:
            raise glue.exceptions.ConcurrentModificationException(
                {"Error": {"Code": "ConcurrentModificationException", "Message": name}}, "CreateTable"
            ) from None
        return "created"
    glue.update_table(DatabaseName=database, TableInput=table_input, VersionId=current["VersionId"], SkipArchive=True)
    return "updated"
