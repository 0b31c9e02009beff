"""Optional mutual TLS on the peer gRPC service, with certificates made by openssl for the test.

A 4-node cluster whose daemons present certificates signed by one CA trains
and protects a job as usual; a client without a certificate of that CA cannot
even complete the handshake (before any shardguard code runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from shardguard.daemon.service import cluster
from shardguard.proto import peer_pb2 as ppb
from shardguard.proto import peer_pb2_grpc as ppb_grpc
from _support import environ, finish, run_trainer, status_of_socket, trainer_log

FAULT_CATEGORY = "peer without a certificate of the cluster's CA (mutual TLS on)"
FAULT_OUTCOME = "handshake refused; nothing reached a handler"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is not installed: cannot make test certificates")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path, name: str) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1 signed by it; returns the three paths."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
            "node.key", "-out", "node.csr", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "node.crt", cwd=d)
    os.chmod(d / "node.key", 0o600)
    return {"SHARDGUARD_TLS_CERT_FILE": str(d / "node.crt"),
            "SHARDGUARD_TLS_KEY_FILE": str(d / "node.key"),
            "SHARDGUARD_TLS_CA_FILE": str(d / "ca.crt")}


def test_a_tls_cluster_protects_and_strangers_cannot_connect(tmp_path: Path) -> None:
    env = make_pki(tmp_path / "pki", "good")
    root = tmp_path / "c"
    with environ(env):
        cluster.up(str(root), 4, 4, 1)
    try:
        out = tmp_path / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 4, 5)
        assert finish(proc) == 0, trainer_log(out)
        deadline = time.monotonic() + 30
        while True:  # the last step's protection and a round of peer probes (over TLS too)
            st = status_of_socket(cluster.sockets(str(root))[1])
            job = next(j for j in st.jobs if j.job == "job")
            if (job.restorable_step >= 2 and job.peers_up == job.peers == 3) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert job.restorable_step >= 2 and job.peers_up == job.peers == 3, job
        req = ppb.StepInfoRequest(job="job")
        # Plain TCP: no handshake at all.
        with grpc.insecure_channel(st.address.control) as ch:
            with pytest.raises(grpc.RpcError) as info:
                ppb_grpc.PeerStub(ch).StepInfo(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS with a certificate from another CA: refused in the handshake.
        other = make_pki(tmp_path / "other", "rogue")
        creds = grpc.ssl_channel_credentials(
            root_certificates=(tmp_path / "pki" / "ca.crt").read_bytes(),
            private_key=Path(other["SHARDGUARD_TLS_KEY_FILE"]).read_bytes(),
            certificate_chain=Path(other["SHARDGUARD_TLS_CERT_FILE"]).read_bytes())
        with grpc.secure_channel(st.address.control, creds) as ch:
            with pytest.raises(grpc.RpcError) as info:
                ppb_grpc.PeerStub(ch).StepInfo(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "refused" not in (root / "node-1" / "daemon.log").read_text()  # no handler ran
    finally:
        cluster.down(str(root))


def test_half_a_tls_configuration_is_refused() -> None:
    from shardguard.daemon.base.config import Config
    from shardguard.daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="tls_ca_file"):
        Config(tls_cert_file="/a.crt", tls_key_file="/a.key")
