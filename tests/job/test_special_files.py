"""Local input that is no regular file: a FIFO, a socket, a link to nothing. Each is a recorded failure with its
reason, none is opened (reading a FIFO would block the run until it is killed), and the run completes."""

import os
import socket
import threading

import pytest

from tests.job.images import make_tree


def test_fifos_sockets_and_dangling_links_are_failures_and_never_opened(tmp_path, weights_file):
    from emr_job.job import JobConfig, run
    from tests.job.results import rows

    # Given a tree of good images plus a FIFO, a socket and a dangling link named like images
    src, out = tmp_path / "in", tmp_path / "out"
    good = make_tree(str(src), labels=("Kiwi",), per_label=2)
    os.mkfifo(src / "Kiwi" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "Kiwi" / "socket.png"))
    os.symlink(src / "Kiwi" / "gone.jpg", src / "Kiwi" / "dangling.jpg")

    # When the job runs (in a thread: were the FIFO opened, it would never return)
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=run(
        JobConfig(input=str(src), output=str(out), weights=weights_file, k=1), log=lambda *a: None,
        session=lambda: pytest.fail("small work needs no Spark"))), daemon=True)  # fmt: skip
    worker.start()
    worker.join(timeout=120)
    sock.close()

    # Then it completes; the good images are featurized and each special file is a failure with its reason
    assert not worker.is_alive(), "the run blocked on a special file"
    assert set(rows(out, "features")) == set(good)
    failures = {os.path.basename(p): r["reason"] for p, r in rows(out, "failures").items()}
    assert failures == {
        "pipe.jpg": "read error: NotAFile: a FIFO",
        "socket.png": "read error: NotAFile: a socket",
        "dangling.jpg": "read error: NotAFile: a symbolic link to nothing",
    }
    assert result["report"]["images_failed"] == 3
