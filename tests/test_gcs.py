"""The job on gs:// input and output, against a local GCS emulator.

The emulator (``gcp-storage-emulator``) runs on 127.0.0.1 for the session.
Beam's GCS filesystem finds it through ``STORAGE_EMULATOR_HOST``. Beam asks
Google's auth library for credentials first and, finding none, retries for
about 30 seconds before going anonymous; so the fixture hands it a service
account made up here, whose token endpoint is a stub on 127.0.0.1. Nothing
leaves the machine.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.inputs import match_archives
from tests.helpers import (
    archive_lines,
    dead_letters,
    read_batches,
    real_sample,
    run,
    summary,
    written_records,
)
from transforms.files import TEMP_DIR, write_atomically

RC_FILES = ("RC_2005-12.zst", "RC_2006-01.zst")
REDDIT_COM_RECORDS = 4739
BAD_LINES = (b"this is not json", b'{"cut": ')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    """Answers every token request with the same bearer token."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps(
            {"access_token": "emulator", "token_type": "Bearer", "expires_in": 3600}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode("ascii"))

    def log_message(self, *_) -> None:
        pass


def _service_account(path: str, token_uri: str) -> None:
    """Writes a service account key made up here, for the emulator only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    account = {
        "type": "service_account",
        "project_id": "emulator",
        "private_key_id": "emulator",
        "private_key": pem,
        "client_email": "tests@emulator.invalid",
        "client_id": "1",
        "token_uri": token_uri,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(account, handle)


@dataclasses.dataclass
class GcsEmulator:
    """A running emulator and a client for it."""

    endpoint: str
    client: object

    def bucket(self, name: str) -> str:
        """Creates a bucket (once) and returns its gs:// root."""
        if self.client.lookup_bucket(name) is None:
            self.client.create_bucket(name)
        return f"gs://{name}"

    def upload(self, local: str, gs_path: str) -> None:
        bucket, _, name = gs_path[len("gs://") :].partition("/")
        self.client.bucket(bucket).blob(name).upload_from_filename(local)

    def paths(self, gs_prefix: str) -> list[str]:
        """Every object under a prefix, as sorted gs:// paths."""
        bucket, _, prefix = gs_prefix[len("gs://") :].partition("/")
        return sorted(
            f"gs://{bucket}/{blob.name}"
            for blob in self.client.list_blobs(bucket, prefix=prefix)
        )

    def read(self, gs_path: str) -> bytes:
        bucket, _, name = gs_path[len("gs://") :].partition("/")
        return self.client.bucket(bucket).blob(name).download_as_bytes()

    def download_tree(self, gs_prefix: str, folder: str) -> str:
        """Copies every object under a prefix into a local folder."""
        root = gs_prefix.rstrip("/") + "/"
        for path in self.paths(root):
            local = os.path.join(folder, path[len(root) :])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as handle:
                handle.write(self.read(path))
        return folder


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator on a free port of 127.0.0.1, stopped after the session."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    folder = tmp_path_factory.mktemp("gcs")
    tokens = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(
        target=tokens.serve_forever, name="token-stub", daemon=True
    ).start()
    credentials = str(folder / "service-account.json")
    _service_account(credentials, f"http://127.0.0.1:{tokens.server_port}/token")

    port = _free_port()
    log = open(folder / "emulator.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "-d",
            str(folder / "data"),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-q",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.close()
                pytest.fail(
                    f"the GCS emulator did not start on 127.0.0.1:{port}:"
                    f" {(folder / 'emulator.log').read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)

    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        patch.setenv("GOOGLE_APPLICATION_CREDENTIALS", credentials)
        patch.setenv("GOOGLE_CLOUD_PROJECT", "emulator")
        patch.setenv("NO_GCE_CHECK", "true")
        client = storage.Client(credentials=AnonymousCredentials(), project="emulator")
        yield GcsEmulator(endpoint, client)
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    tokens.shutdown()
    tokens.server_close()


def _bad_lines_file(folder) -> tuple[str, list[tuple[int, bytes]]]:
    """A small NDJSON file of three good records and two lines that are not JSON."""
    good = [line for _, line in archive_lines(real_sample("RC_2005-12.zst"))[:3]]
    lines = [good[0], BAD_LINES[0], good[1], BAD_LINES[1], good[2]]
    path = os.path.join(folder, "extra.ndjson")
    with open(path, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    return path, archive_lines(path)


@pytest.fixture(scope="module")
def samples_on_gcs(gcs_emulator, real_data, tmp_path_factory):
    """The RC samples and a file with bad lines, uploaded to gs://samples."""
    root = gcs_emulator.bucket("samples")
    for name in RC_FILES:
        gcs_emulator.upload(real_sample(name), f"{root}/{name}")
    local = tmp_path_factory.mktemp("local-samples")
    for name in RC_FILES:
        shutil.copy(real_sample(name), local / name)
    extra, _ = _bad_lines_file(str(local))
    gcs_emulator.upload(extra, f"{root}/extra/extra.ndjson")
    return root, str(local)


def _job_arguments(inputs: list[str], output: str, *extra: str) -> list[str]:
    return [
        *(f"--input={pattern}" for pattern in inputs),
        f"--output={output}",
        "--subreddit=reddit.com",
        "--batch_size=100",
        *extra,
    ]


@pytest.fixture(scope="module")
def local_reference(samples_on_gcs, tmp_path_factory):
    """The same job on local copies of the same files: (summary, output)."""
    _, local = samples_on_gcs
    output = str(tmp_path_factory.mktemp("local-run") / "out")
    result = run(
        _job_arguments(
            [os.path.join(local, "RC_*.zst"), os.path.join(local, "extra.ndjson")],
            output,
        )
    )
    return result, output


def test_glob_on_gcs_matches_the_uploaded_archives(gcs_emulator, samples_on_gcs):
    root, _ = samples_on_gcs

    archives = match_archives([f"{root}/RC_*.zst"])

    assert [(spec.archive_id, spec.path, spec.size) for spec in archives] == [
        (0, f"{root}/RC_2005-12.zst", os.path.getsize(real_sample("RC_2005-12.zst"))),
        (1, f"{root}/RC_2006-01.zst", os.path.getsize(real_sample("RC_2006-01.zst"))),
    ]


def test_write_atomically_replaces_a_gcs_file_and_leaves_no_temporary(gcs_emulator):
    output = gcs_emulator.bucket("atomic") + "/run"
    target = f"{output}/batches/one.jsonl.zst"

    write_atomically(output, target, b"first")
    write_atomically(output, target, b"second")

    assert gcs_emulator.read(target) == b"second"
    assert gcs_emulator.paths(output + "/") == [target]
    assert FileSystems.match([f"{output}/{TEMP_DIR}/*"])[0].metadata_list == []


@pytest.mark.parametrize(
    "runner_flags",
    [
        pytest.param([], id="direct"),
        pytest.param(
            ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
            id="direct-multi-processing",
        ),
        pytest.param(["--runner=PrismRunner"], id="prism", marks=pytest.mark.runners),
    ],
)
def test_job_reads_and_writes_gcs_as_it_does_local_files(
    gcs_emulator, samples_on_gcs, local_reference, runner_flags, tmp_path
):
    root, local = samples_on_gcs
    reference, local_output = local_reference
    output = gcs_emulator.bucket("results") + f"/{tmp_path.name}"

    result = run(
        _job_arguments(
            [f"{root}/RC_*.zst", f"{root}/extra/*.ndjson"], output, *runner_flags
        )
    )

    copied = gcs_emulator.download_tree(output, str(tmp_path / "copied"))
    written = written_records(copied)
    assert sorted(written) == sorted(written_records(local_output))
    assert len(written) == REDDIT_COM_RECORDS + 3
    assert sorted(map(len, read_batches(copied).values())) == sorted(
        map(len, read_batches(local_output).values())
    )

    letters = dead_letters(copied)
    assert [
        (letter["archive"], letter["offset"], letter["line"]) for letter in letters
    ] == [
        ("extra.ndjson", offset, line.decode())
        for offset, line in archive_lines(os.path.join(local, "extra.ndjson"))
        if line in BAD_LINES
    ]
    assert [letter["reason"] for letter in letters] == [
        letter["reason"] for letter in dead_letters(local_output)
    ]

    written_summary = summary(copied)
    assert written_summary["status"] == result["status"] == "succeeded"
    counters = (
        "records_read",
        "records_matched",
        "records_written",
        "batches_written",
        "dead_letters",
    )
    assert {name: written_summary[name] for name in counters} == {
        name: reference[name] for name in counters
    }
    assert written_summary["records_read"] == 1075 + 3666 + 3
    assert [archive["path"] for archive in written_summary["archives"]] == [
        f"{root}/RC_2005-12.zst",
        f"{root}/RC_2006-01.zst",
        f"{root}/extra/extra.ndjson",
    ]
    assert not [path for path in gcs_emulator.paths(f"{output}/{TEMP_DIR}/")]
