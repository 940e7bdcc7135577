"""The `ratpt` command's own flags: a mistake in them is one line naming the flag, not a traceback."""
import pytest

from ratpt.cli import main


@pytest.mark.parametrize("level", ["FOO", "5", ""], ids=["unknown-name", "a-number", "empty"])
def test_an_unknown_log_level_is_refused_naming_the_flag_and_the_levels(capsys, level):
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", level, "train", "x.yaml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --log-level: {level!r} is not a logging level: use one of DEBUG, INFO, WARNING" in err
    assert "Traceback" not in err


def test_an_unknown_log_level_in_the_environment_is_refused_naming_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("RATPT_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit):
        main(["train", "x.yaml"])
    err = capsys.readouterr().err
    assert "'verbose' is not a logging level" in err and "RATPT_LOG_LEVEL" in err


def test_a_log_level_in_lower_case_is_accepted(capsys):
    assert main(["--log-level", "warning", "train", "no-such-config.yaml"]) == 2  # the config's error, not the flag's
    assert "config file no-such-config.yaml does not exist" in capsys.readouterr().err
