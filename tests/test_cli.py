"""The command line: help that says what each option defaults to, -v anywhere, a train that needs a config,
and MLflow's own progress bars and links kept out of carclf's output."""

import argparse
from pathlib import Path

import pytest
import yaml

from carclf import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_mlflow_settings(monkeypatch):
    """cli.main sets MLflow's variables in os.environ: put them back as they were after each test."""
    for key in cli.QUIET_MLFLOW:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


def _subparsers(parser: argparse.ArgumentParser, path=()):
    """(command words, parser) for every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def _commands():
    return list(_subparsers(cli.build_parser()))


@pytest.mark.parametrize("words, parser", _commands(), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_option_says_its_default(words, parser):
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue  # a flag is off unless given; a required option has no default
        shown = parser.formatter_class(prog="carclf")._get_help_string(action)
        assert "default" in shown, f"carclf {' '.join(words)} {action.option_strings[-1]}: {shown!r}"
        assert action.help and action.help.split("(default")[0].strip(), f"{action.option_strings[-1]} has no help"


def test_the_options_a_newcomer_asked_about_show_their_defaults(capsys):
    expected = {("predict",): ["--top-k TOP_K", "(default: 3)"], ("promote",): ["(default: champion)"],
                ("data", "demo"): ["(default: 0)"], ("data", "split"): ["(default: 0.7 0.1 0.2)", "(default: 0)"],
                ("ui",): ["(default: 5000)"]}
    for words, snippets in expected.items():
        with pytest.raises(SystemExit):
            cli.main([*words, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for snippet in snippets:
            assert snippet in out, (words, snippet)


def test_top_level_help_says_in_one_line_what_carclf_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "\n" not in cli.DESCRIPTION and cli.DESCRIPTION.count(". ") == 0  # one sentence
    for words in ("car-model image classifiers", "sweeps", "MLflow"):
        assert words in " ".join(out.split())


@pytest.mark.parametrize("argv, verbose", [
    (["report", "quickstart"], False),
    (["-v", "report", "quickstart"], True),
    (["report", "quickstart", "-v"], True),
    (["report", "-v", "quickstart"], True),
    (["data", "demo", "out", "--verbose"], True),
    (["-v", "data", "demo", "out"], True),
])
def test_verbose_works_before_and_after_the_subcommand(argv, verbose):
    assert cli.build_parser().parse_args(argv).verbose is verbose


def test_predict_help_names_a_model_the_quickstart_registers():
    parser = dict(_commands())[("predict",)]
    uri_help = next(a.help for a in parser._actions if a.dest == "model_uri")
    families = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())["models"]
    named = [f for f in families if f"models:/carclf-{f}@champion" in uri_help]
    assert named, f"predict's help names no family of sweeps/quickstart.yaml ({', '.join(families)})"
    assert "models:/carclf-best@champion" in uri_help  # promote marks the winner there


def test_train_without_a_config_says_what_it_needs_and_trains_nothing(monkeypatch, capsys):
    import carclf.experiment

    monkeypatch.setattr(carclf.experiment, "run_experiment", lambda *a, **k: pytest.fail("must not train"))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "examples/run_svm.yaml" in err and "demo_data" in err


def _one_class(root: Path) -> Path:
    from conftest import encode, random_image

    (root / "only").mkdir(parents=True)
    for i in range(6):
        (root / "only" / f"{i}.png").write_bytes(encode(random_image(i), "PNG"))
    return root


@pytest.mark.parametrize("case", ["file", "one_class", "cuda"])
def test_train_refuses_unusable_data_or_device_before_any_run(case, tmp_path, monkeypatch, capsys):
    import torch

    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "photos.zip" if case == "file" else _one_class(tmp_path / "cars")
    if case == "file":
        data.write_bytes(b"PK")
    db = tmp_path / "mlflow.db"
    args = ["train", "--config", str(ROOT / "examples" / "run_cnn.yaml"), "--set", f"data.path={data}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"tracking.uri=sqlite:///{db}"]
    if case == "cuda":
        args += ["--set", "train.device=cuda"]
    assert cli.main(args) == 2
    expected = {"file": f"not a folder: {data}", "one_class": "a classifier needs at least 2 classes",
                "cuda": "train.device=cuda, but torch finds no CUDA device"}[case]
    assert expected in capsys.readouterr().err
    assert not db.exists()  # no run was started, not even the store was made


def test_mlflow_progress_bars_and_run_links_are_off_unless_the_user_wants_them():
    env = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "false"}  # the user's choice stays
    cli.quiet_mlflow(env)
    assert env == {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def test_main_quiets_mlflow_before_any_command_runs(monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
        MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    )

    seen = {}

    def command(args):
        seen.update(bar=MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get(), url=MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get())
        return 0

    monkeypatch.setattr(cli, "_handler", lambda target: command)
    assert cli.main(["report", "quickstart"]) == 0
    assert seen == {"bar": False, "url": True}  # as MLflow itself reads its settings
