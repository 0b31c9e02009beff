"""Job identity: a job name that cannot collide by accident (issue 10, item 2)."""

from __future__ import annotations

import pytest

from shardguard.client.membership import JOB_ENV, detect_job
from shardguard.proto.errors import ConfigError, JobNameError

NAMES = (JOB_ENV, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    for key in NAMES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_shardguard_job_wins(env) -> None:
    env.setenv(JOB_ENV, "mine")
    env.setenv("SLURM_JOB_ID", "42")
    env.setenv("TORCHELASTIC_RUN_ID", "none")
    assert detect_job() == "mine"


def test_slurm_job_id_before_torchrun(env) -> None:
    env.setenv("SLURM_JOB_ID", "42")
    env.setenv("TORCHELASTIC_RUN_ID", "none")
    assert detect_job() == "42"


def test_torchrun_rdzv_id_names_the_job(env) -> None:
    env.setenv("TORCHELASTIC_RUN_ID", "llama-7b-run3")
    assert detect_job() == "llama-7b-run3"


def test_torchrun_default_run_id_is_refused(env) -> None:
    env.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(JobNameError, match="--rdzv-id") as info:
        detect_job()
    assert JOB_ENV in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_no_name_at_all_is_refused(env) -> None:
    with pytest.raises(JobNameError, match=JOB_ENV):
        detect_job()
