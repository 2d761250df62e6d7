"""The "documents" storage on an S3-compatible object store (django-storages
and boto3), against a real S3 API: moto's server, on a local port for this test."""
import socket

import boto3
import pytest

from documents import services
from documents.models import Chunk
from tests.documents.conftest import PRIDE, pdf

pytestmark = pytest.mark.django_db
BUCKET = "chat-documents"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(settings, monkeypatch):
    from moto.server import ThreadedMotoServer

    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"bucket_name": BUCKET, "endpoint_url": endpoint, "access_key": "test", "secret_key": "test",
               "region_name": "us-east-1", "default_acl": None, "file_overwrite": False}
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    settings.STORAGES = {**settings.STORAGES, "documents": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options}}
    yield client
    server.stop()


def _keys(client) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def test_upload_ingest_and_delete_through_the_object_store(alice, upload, s3, django_capture_on_commit_callbacks):
    document = upload(alice, "novel.pdf", pdf(PRIDE, "Mr. Bennet lives at Longbourn."))
    assert document.status == "ready" and Chunk.objects.filter(document=document).count() == 2
    assert _keys(s3) == {document.storage_key}
    assert s3.get_object(Bucket=BUCKET, Key=document.storage_key)["Body"].read().startswith(b"%PDF-")
    with django_capture_on_commit_callbacks(execute=True):
        services.document_delete(document=document)
    assert _keys(s3) == set()


def test_a_refused_file_never_reaches_the_bucket(alice, s3):
    with pytest.raises(Exception, match="not a PDF"):
        services.document_upload(user=alice, name="x.pdf", data=b"nope")
    assert _keys(s3) == set()
