from dheads.platform import storage


def test_local_roundtrip_atomic(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.list_files(str(tmp_path)) == [uri]  # no temporary left behind


def test_s3_roundtrip(s3_bucket):
    bucket, cfg = s3_bucket
    uri = f"s3://{bucket}/x/y z é.bin"
    storage.write_bytes(uri, b"abc", cfg)
    assert storage.exists(uri, cfg)
    assert storage.read_bytes(uri, cfg) == b"abc"
    assert storage.list_files(f"s3://{bucket}/x", (".bin",), cfg) == [uri]
    with storage.local_path(uri, cfg) as p:
        assert open(p, "rb").read() == b"abc"
    storage.delete(uri, cfg)
    assert not storage.exists(uri, cfg)
