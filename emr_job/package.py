"""Build what EMR runs: `python -m emr_job.package dist` -> dist/emr_job.zip (--py-files) and dist/main.py."""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def build(dest: str) -> list:
    os.makedirs(dest, exist_ok=True)
    archive = os.path.join(dest, "emr_job.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(PACKAGE.rglob("*.py")):
            if "__pycache__" not in path.parts:
                # Fixed timestamps: the same sources give the same archive (and the same S3 ETag).
                info = zipfile.ZipInfo(str(path.relative_to(PACKAGE.parent)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    entry = os.path.join(dest, "main.py")
    shutil.copyfile(PACKAGE / "main.py", entry)
    return [archive, entry]


if __name__ == "__main__":
    for built in build(sys.argv[1] if len(sys.argv) > 1 else "dist"):
        print(built)
