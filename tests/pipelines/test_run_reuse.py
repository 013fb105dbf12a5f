"""A run is never silently reused: a re-run under an existing run name resumes only under the training
settings the run was started with; other settings are refused naming each key (old -> new), unless
continued explicitly; settings that change nothing trained (logging, tracking, storage) never block a
resume; and a config without a run name gets one that follows its training settings.

The checkpoints here are folders as Ray Train commits them (see test_storage.py); the real runs that
resume are in test_train.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config_loading import load_config
from pipelines.orchestration.storage import read_run_record
from pipelines.orchestration.train import claim_run
from pipelines.training.state import HF_MODEL_DIR, ResumeError, check_training_settings
from tests.pipelines.test_storage import checkpoint_folder, ray_record


def tiny(storage: Path, *overrides: str):
    return load_config(None, [f"checkpointing.storage_path={storage}", *overrides])


def started_run(storage: Path, *overrides: str, step: int = 16):
    """A finished run of the default config: it recorded its settings, and Ray Train committed its final
    checkpoint (at ``step``, holding the exported model)."""
    cfg = tiny(storage, "run_name=mine", *overrides)
    claim_run(cfg, str(storage), resume_with_changes=False)
    (checkpoint_folder(storage / "mine", "checkpoint_a", step=step) / HF_MODEL_DIR).mkdir()
    ray_record(storage / "mine", ["checkpoint_a"])
    return cfg


# --------------------------------------------------------------------------- the default run name


def test_without_a_run_name_the_name_is_the_config_the_method_and_a_hash_of_the_training_settings():
    name = load_config().run_name
    config, method, digest = name.rsplit("-", 2)
    assert (config, method, len(digest)) == ("tiny", "ift", 8)


def test_another_method_or_learning_rate_gets_another_default_run_name():
    names = {load_config(None, o).run_name for o in ([], ["method.name=sft"], ["optimization.lr=1e-3"])}
    assert len(names) == 3


def test_logging_tracking_and_storage_changes_keep_the_default_run_name():
    changed = ["mlflow.experiment=other", "optimization.log_every_n_steps=7", "checkpointing.storage_path=/elsewhere"]
    assert load_config(None, changed).run_name == load_config().run_name


def test_a_packaged_config_with_a_run_name_keeps_it():
    assert load_config("mistral-7b-ift").run_name == "mistral-7b-ift"


# --------------------------------------------------------------------------- the check itself


def test_changed_training_settings_are_refused_naming_each_key_old_and_new():
    with pytest.raises(ResumeError) as err:
        recorded, current = (
            {"method.name": "ift", "optimization.lr": 0.003},
            {"method.name": "sft", "optimization.lr": 0.003},
        )
        check_training_settings(16, recorded, current, resume_with_changes=False)
    message = str(err.value)
    assert "method.name: 'ift' -> 'sft'" in message and "optimization.lr" not in message
    assert "run_name" in message and "--resume-with-changes" in message and "step 16" in message


def test_a_setting_the_run_did_not_record_shows_as_unset():
    with pytest.raises(ResumeError, match=r"method.lam: <unset> -> 0.5"):
        check_training_settings(4, {}, {"method.lam": 0.5}, resume_with_changes=False)


def test_resume_with_changes_returns_what_changed():
    changes = check_training_settings(
        8, {"optimization.lr": 0.003}, {"optimization.lr": 0.001}, resume_with_changes=True
    )
    assert changes == {"optimization.lr": [0.003, 0.001]}


@pytest.mark.parametrize("key", ["model.name", "model.lora.r", "deepspeed.zero_stage"])
def test_the_model_its_adapters_and_the_zero_stage_cannot_change_even_when_asked(key):
    with pytest.raises(ResumeError, match=rf"{key} cannot change within a run"):
        check_training_settings(8, {key: 1}, {key: 2}, resume_with_changes=True)


# --------------------------------------------------------------------------- claim_run: the record in the run's folder


def test_a_new_run_records_its_training_settings_in_its_folder(tmp_path):
    cfg = tiny(tmp_path, "run_name=mine")
    assert claim_run(cfg, str(tmp_path), resume_with_changes=False) == (None, {})
    assert read_run_record(str(tmp_path), "mine")["training_settings"] == cfg.training_settings()


def test_rerunning_with_another_method_is_refused_naming_method_name(tmp_path):
    started_run(tmp_path)
    with pytest.raises(ResumeError, match=r"method.name: 'ift' -> 'sft'"):
        claim_run(tiny(tmp_path, "run_name=mine", "method.name=sft"), str(tmp_path), resume_with_changes=False)


def test_rerunning_with_a_logging_option_changed_resumes_from_the_checkpoint(tmp_path):
    started_run(tmp_path)
    cfg = tiny(tmp_path, "run_name=mine", "optimization.log_every_n_steps=1", "mlflow.experiment=elsewhere")
    previous, changes = claim_run(cfg, str(tmp_path), resume_with_changes=False)
    assert previous[1].step == 16 and changes == {}


def test_resume_with_changes_continues_and_records_the_new_settings_for_the_next_rerun(tmp_path):
    started_run(tmp_path)
    cfg = tiny(tmp_path, "run_name=mine", "optimization.lr=1e-3")
    previous, changes = claim_run(cfg, str(tmp_path), resume_with_changes=True)
    assert previous[1].step == 16 and changes == {"optimization.lr": [0.003, 0.001]}
    record = read_run_record(str(tmp_path), "mine")
    assert record["changes"] == [{"from_step": 16, "changes": {"optimization.lr": [0.003, 0.001]}}]
    assert claim_run(cfg, str(tmp_path), resume_with_changes=False)[1] == {}  # now the run's own settings


def test_a_run_that_never_checkpointed_starts_again_under_any_settings(tmp_path):
    tiny_run = tiny(tmp_path, "run_name=mine")
    claim_run(tiny_run, str(tmp_path), resume_with_changes=False)  # died before its first checkpoint
    cfg = tiny(tmp_path, "run_name=mine", "method.name=sft")
    assert claim_run(cfg, str(tmp_path), resume_with_changes=False) == (None, {})
    assert read_run_record(str(tmp_path), "mine")["training_settings"]["method.name"] == "sft"


def test_ift_train_refuses_a_changed_rerun_with_exit_2_before_starting_ray(tmp_path, capsys):
    import ray

    started_run(tmp_path)
    code = main(["train", f"checkpointing.storage_path={tmp_path}", "run_name=mine", "method.name=sft"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume run 'mine'" in err and "method.name: 'ift' -> 'sft'" in err
    assert not ray.is_initialized()


def test_the_dry_run_refuses_a_changed_rerun_as_ift_train_does(tmp_path, capsys):
    started_run(tmp_path)
    code = main(["train", "--dry-run", f"checkpointing.storage_path={tmp_path}", "run_name=mine", "method.name=sft"])
    assert code == 2 and "method.name: 'ift' -> 'sft'" in capsys.readouterr().err


def test_the_dry_run_says_a_rerun_resumes_and_from_which_step(tmp_path, capsys):
    started_run(tmp_path)
    assert main(["train", "--dry-run", f"checkpointing.storage_path={tmp_path}", "run_name=mine"]) == 0
    assert "run 'mine': resumes from its checkpoint at step 16" in capsys.readouterr().out
