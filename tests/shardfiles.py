"""Shard files written by hand for the tests: webdataset tars with chosen members."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive holding ``members`` as (name, data), in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
