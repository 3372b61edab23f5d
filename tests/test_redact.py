"""Credentials are redacted in URIs and in any text holding URIs; everything else is left as it was."""

from __future__ import annotations

import logging

import pytest

from carclf.core.redact import MASK, RedactingFormatter, redact, strip_credentials


@pytest.mark.parametrize("uri, expected", [
    ("postgresql://mlflow:s3cret@db:5432/mlflow", f"postgresql://mlflow:{MASK}@db:5432/mlflow"),
    ("postgresql+psycopg2://u:p%40ss@db/x", f"postgresql+psycopg2://u:{MASK}@db/x"),
    ("postgresql://u:pa/ss@db/x", f"postgresql://u:{MASK}@db/x"),  # SQLAlchemy reads a '/' into the password
    ("http://user:1234@host", f"http://user:{MASK}@host"),
    ("mysql://u@db/x?password=p;sslkey=/etc/k", f"mysql://u@db/x?password={MASK};sslkey=/etc/k"),
    ("https://b.example/o?X-Amz-Signature=ab&X-Amz-Credential=AK&v=1#top",
     f"https://b.example/o?X-Amz-Signature={MASK}&X-Amz-Credential={MASK}&v=1#top"),
    ("https://h/x?access_token=t&sig=s&api_key=k&page=2",
     f"https://h/x?access_token={MASK}&sig={MASK}&api_key={MASK}&page=2"),
])
def test_passwords_and_secret_query_parameters_are_masked(uri, expected):
    assert redact(uri) == expected


@pytest.mark.parametrize("text", [
    "sqlite:////abs/path/mlflow.db", "http://127.0.0.1:5000", "http://host:5000/a@b", "s3://bucket/carclf/ray",
    "postgresql://mlflow@db/x", "no uri at all: user:pass@host", "https://h/x?page=2&q=cars",
])
def test_text_without_credentials_is_unchanged(text):
    assert redact(text) == text


def test_every_uri_in_a_message_is_redacted():
    msg = "cannot reach 'http://a:one@h1:1' or <postgresql://b:two@h2/db>; export MLFLOW_TRACKING_URI=http://c:three@h3"
    out = redact(msg)
    assert not any(word in out for word in ("one", "two", "three"))
    assert out.count(MASK) == 3 and out.startswith("cannot reach 'http://a:***@h1:1'")


def test_log_lines_are_formatted_redacted():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "backend %s", ("postgresql://u:secret@db/x",), None)
    assert RedactingFormatter("%(message)s").format(record) == f"backend postgresql://u:{MASK}@db/x"


def test_strip_credentials_leaves_the_address_only():
    assert strip_credentials("http://u:secret@127.0.0.1:5000/x?a=1") == "http://127.0.0.1:5000/x?a=1"
    assert strip_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_carclf_train_prints_its_tracking_uri_without_the_password(tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    from carclf import experiment

    class Stop(Exception):
        pass

    def no_run(cfg, **kw):  # the first line is printed before the run starts: stop there
        raise Stop

    monkeypatch.setattr(experiment, "run_experiment", no_run)
    monkeypatch.setattr(experiment.tracking, "_check_database_driver", lambda uri: None)  # as if psycopg were installed
    monkeypatch.setattr("carclf.experiment.prepare_data", lambda cfg, **kw: None)  # the data is not what this test is about
    config = tmp_path / "run.yaml"
    config.write_text("tracking: {uri: 'postgresql://mlflow:s3cret@db:5432/mlflow'}\n")
    with pytest.raises(Stop):
        experiment.cli_train(Namespace(config=str(config), overrides=[]))
    out = capsys.readouterr().out
    assert f"tracking postgresql://mlflow:{MASK}@db:5432/mlflow" in out and "s3cret" not in out
