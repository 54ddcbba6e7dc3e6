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


def write_img2dataset(dataset, root: str, splits=("train", "test"), tars: bool = False, labels: bool = True,
                      rows_per_shard: int = 25) -> None:
    """``dataset``'s splits (a :class:`pipeline.data.reference.Dataset`) laid out as img2dataset writes them.

    Parquet shards with ``key``/``jpg``/``txt`` and ``cls`` as text (``"3\\n"``),
    or with ``tars`` webdataset tars of ``KEY.jpg``/``KEY.txt``/``KEY.cls``
    members; no ``metadata.json``. ``labels=False`` leaves ``cls`` out.
    ``root`` may be a local folder or an object-store URL.
    """
    import pyarrow as pa

    from pipeline import storage

    for split in splits:
        rows = dataset.splits[split]
        if tars:
            for start in range(0, rows.num_rows, rows_per_shard):
                members = []
                for row in rows.slice(start, rows_per_shard).to_pylist():
                    members += [(f"{row['key']}.jpg", row["image"]), (f"{row['key']}.txt", row["caption"].encode())]
                    if labels:
                        members.append((f"{row['key']}.cls", f"{row['label']}\n".encode()))
                storage.write_bytes(tar_bytes(members), storage.join(root, split, f"{start // rows_per_shard:05d}.tar"))
            continue
        table = pa.table({"key": rows.column("key"), "jpg": rows.column("image"), "txt": rows.column("caption")})
        if labels:
            table = table.append_column("cls", pa.array([f"{v}\n" for v in rows.column("label").to_pylist()]))
        storage.write_shards(table, storage.join(root, split), rows_per_shard=rows_per_shard)
