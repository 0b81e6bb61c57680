"""Config validation names the bad field; the CLI turns dataclass fields into flags."""
import pytest

from scylla.commands.cli import main
from scylla.config import DecodeConfig, DraftConfig, TargetSpec, TrainConfig
from scylla.errors import ConfigError


@pytest.mark.parametrize("cls,kwargs,field", [
    (DecodeConfig, {"decode_batch_size": 0}, "decode_batch_size"),
    (DecodeConfig, {"method": "beam"}, "method"),
    (DecodeConfig, {"sample_top_p": 0.0}, "sample_top_p"),
    (DecodeConfig, {"temperature": -1.0}, "temperature"),
    (DraftConfig, {"draft_n_layer": 0}, "draft_n_layer"),
    (TrainConfig, {"train_tokens": 0}, "train_tokens"),
    (TargetSpec, {"dtype": "int8"}, "dtype"),
])
def test_bad_values_name_their_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}="):
        cls(**kwargs)


def test_cli_reports_config_errors_as_one_line(capsys):
    assert main(["bench", "--decode-batch-size", "0", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "DecodeConfig.decode_batch_size=0" in err and "Traceback" not in err


def test_targets_command_lists_the_registry(capsys):
    assert main(["targets"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
