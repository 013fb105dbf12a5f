"""pipelines.config: one validated schema; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, TrainConfig
from pipelines.config_loading import (
    apply_overrides,
    describe_config,
    flatten,
    load_config,
    packaged_config_names,
    packaged_config_path,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", packaged_config_names())
def test_every_shipped_training_config_validates(name):
    cfg = load_config(packaged_config_path(name))
    assert isinstance(cfg, TrainConfig)
    for src in cfg.data.train + cfg.data.validation:
        if not src.path.startswith("hf:"):
            assert Path(src.path).exists(), f"{name}: {src.path} does not exist"


def test_default_config_is_the_packaged_tiny_ift_run():
    cfg = load_config()
    assert cfg.model.name == "tiny" and cfg.method.name == "ift"
    assert cfg.method.lam == 0.2 and cfg.method.decay == 0.95


def test_misspelled_key_is_an_error_that_names_it_and_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"optimization\.lrr: unknown key \(did you mean 'optimization\.lr'\?\)"):
        load_config(None, ["optimization.lrr=0.1"])


def test_misspelled_key_inside_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(packaged_config_path("tiny").read_text().replace("micro_batch_size", "micro_batchsize"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "optimization.micro_batchsize: unknown key" in str(err.value)


def test_unknown_key_in_a_data_source_list_item_is_named():
    with pytest.raises(
        ConfigError, match=r"data\.train\.0\.pth: unknown key \(did you mean 'data\.train\.0\.path'\?\)"
    ):
        load_config(None, ["data.train=[{pth: x.jsonl}]"])


def test_wrong_type_names_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"optimization\.micro_batch_size: .*'eight'"):
        load_config(None, ["optimization.micro_batch_size=eight"])


def test_out_of_range_lambda_is_rejected():
    with pytest.raises(ConfigError, match=r"method\.lam"):
        load_config(None, ["method.lam=1.5"])


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["a.b=1e-4", "c=[1, 2]", "d=true", "e=hello"]) == [
        ("a.b", 1e-4),
        ("c", [1, 2]),
        ("d", True),
        ("e", "hello"),
    ]


def test_override_without_equals_sign_says_the_expected_form():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optimization.lr"])


def test_overrides_change_the_resolved_config():
    cfg = load_config(None, ["method.name=dpo", "deepspeed.zero_stage=3", "run_name=x"])
    assert (cfg.method.name, cfg.deepspeed.zero_stage, cfg.run_name) == ("dpo", 3, "x")
    assert cfg.method.beta == 0.1


def test_orpo_beta_defaults_to_the_papers_value():
    assert load_config(None, ["method.name=orpo"]).method.beta == 0.25


def test_switching_method_drops_the_options_of_the_configs_method():
    cfg = load_config(None, ["method.name=sft"])  # tiny.yaml sets IFT's lam and decay
    assert cfg.method.name == "sft" and cfg.method.hyperparameters() == {}


def test_method_name_applies_first_wherever_it_stands_among_the_overrides():
    cfg = load_config(None, ["method.beta=0.3", "method.name=dpo"])
    assert (cfg.method.name, cfg.method.beta) == ("dpo", 0.3)


def test_an_option_of_another_method_is_an_error_naming_the_key_and_the_method():
    with pytest.raises(ConfigError, match=r"method\.lam: unknown key for method 'sft'"):
        load_config(None, ["method.name=sft", "method.lam=0.3"])


def test_an_unknown_method_lists_the_methods():
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'ppo' \(choose from ift, sft, dpo, orpo\)"):
        load_config(None, ["method.name=ppo"])


def test_a_method_section_without_a_name_is_ift(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: [{path: x.jsonl}]\nmethod:\n  lam: 0.3\n")
    cfg = load_config(path)
    assert (cfg.method.name, cfg.method.lam) == ("ift", 0.3)


def test_missing_config_file_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-config.yaml")


def test_packaged_config_can_be_named_without_path():
    assert load_config("tiny").run_name == load_config().run_name


def test_incompatible_options_are_rejected():
    with pytest.raises(ConfigError, match="offload_param needs"):
        load_config(None, ["deepspeed.offload_param=true", "deepspeed.zero_stage=2"])


def test_a_pack_shorter_than_the_longest_sequence_is_rejected_naming_both_keys():
    with pytest.raises(ConfigError, match=r"data.pack_length=100 is shorter than a sequence: 256 tokens"):
        load_config(None, ["data.packing=true", "data.pack_length=100"])
    with pytest.raises(ConfigError, match=r"data.pack_length=300 is shorter than a pair of max_length sequences"):
        load_config(None, ["data.packing=true", "data.pack_length=300", "method.name=dpo"])


def test_a_packed_row_defaults_to_room_for_the_longest_example():
    assert load_config(None, ["data.packing=true"]).data.resolved_pack_length(paired=False) == 256
    assert load_config(None, ["data.packing=true", "method.name=orpo"]).data.resolved_pack_length(paired=True) == 512


def test_flash_attention_on_a_cpu_run_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2 needs CUDA GPUs"):
        load_config(None, ["model.attn_implementation=flash_attention_2", "scaling.use_gpu=false"])


def test_apply_overrides_revalidates():
    cfg = apply_overrides(load_config(), {"method.lam": 0.4})
    assert cfg.method.lam == 0.4
    with pytest.raises(ConfigError, match="method.lam"):
        apply_overrides(cfg, {"method.lam": 3})


def test_flatten_gives_dotted_params():
    flat = flatten(load_config())
    assert flat["method.lam"] == 0.2 and "data.train.0.path" in flat


def key_table(text: str) -> dict[str, list[str]]:
    """``describe_config``'s table -> key: its other cells (value, type, help; or value, "type: help" on a
    narrow terminal), each cell's wrapped lines joined; asserts that every line keeps to the columns."""
    import re

    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("key "))
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", lines[header])]  # a column: after 2+ blanks
    cells: dict[str, list[str]] = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            continue
        for start in starts:  # nothing runs into the next column
            assert len(line) <= start or line[start - 1] == " ", line
        parts = [line[a:b].strip() for a, b in zip([0, *starts], [*starts, None], strict=True)]
        if parts[0]:
            key = parts[0]
            cells[key] = parts[1:]
        else:  # a cell's next line
            cells[key] = [" ".join(filter(None, (c, p))) for c, p in zip(cells[key], parts[1:], strict=True)]
    return cells


def test_the_key_table_shows_what_the_config_runs_with_and_what_is_allowed():
    rows = key_table(describe_config(load_config(None, ["optimization.epochs=5"]), width=160))
    assert "propagation decay" in rows["method.decay"][2]
    assert rows["optimization.lr"][0] == "0.003"  # tiny.yaml's, not the schema's 0.0005
    assert rows["optimization.epochs"][0] == "5"  # the override
    assert rows["method.name"][:2] == ["ift", "one of ift, sft, dpo, orpo"]
    assert rows["data.truncation"][1] == "one of truncate_left, truncate_right, drop"
    assert rows["model.lora"][:2] == ["null", "section or null"]
    assert rows["model.lora.r"][:2] == ["(16)", "int, > 0"]  # unset section: its default
    assert rows["data.validation_fraction"][1] == "float, >= 0, < 1"
    assert rows["optimization.betas"][:2] == ["[0.9, 0.95]", "[float, float]"]
    assert "method.beta" not in rows  # another method's key


def test_on_a_narrow_terminal_the_type_opens_the_help():
    rows = key_table(describe_config(load_config(), width=90))
    assert rows["data.truncation"] == ["truncate_left", "one of truncate_left, truncate_right, drop: What to do "
                                       "with rows longer than max_length."]  # fmt: skip


def test_the_key_table_lists_the_keys_of_the_configs_method_and_an_empty_lists_item_keys():
    rows = key_table(describe_config(load_config(None, ["method.name=dpo", "data.validation=[]"]), width=200))
    assert rows["method.beta"][:2] == ["0.1", "float, > 0"] and "method.lam" not in rows
    assert rows["data.validation"][0] == "0 items" and rows["data.validation.<i>.path"][0] == "required"


def test_the_first_command_line_item_is_the_config_unless_it_is_an_override():
    from pipelines.config_loading import split_config_argument

    assert split_config_argument(["my.yaml", "a.b=1"]) == ("my.yaml", ["a.b=1"])
    assert split_config_argument(["tiny-zero3"]) == ("tiny-zero3", [])
    assert split_config_argument(["a.b=1", "c=2"]) == (None, ["a.b=1", "c=2"])
    assert split_config_argument([]) == (None, [])


def test_data_paths_in_a_yaml_are_relative_to_the_yaml_and_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "cfg" / "run.yaml").write_text("data:\n  train:\n    - path: rows.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("cfg/run.yaml")
    assert cfg.data.train[0].path == str(tmp_path / "cfg" / "rows.jsonl")


def test_data_paths_in_overrides_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train=[{path: mine.jsonl}]", "data.validation=[{path: 'shards/*.jsonl'}]"])
    assert cfg.data.train[0].path == str(tmp_path / "mine.jsonl")
    assert cfg.data.validation[0].path == str(tmp_path / "shards" / "*.jsonl")  # a glob may match later


def test_hub_ids_uris_and_missing_relative_paths_are_left_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train=[{path: 'hf:org/set'}, {path: 's3://b/k.jsonl'}, {path: nowhere.jsonl}]"])
    assert [s.path for s in cfg.data.train] == ["hf:org/set", "s3://b/k.jsonl", "nowhere.jsonl"]


def test_sweep_overrides_resolve_data_paths_against_the_working_directory(tmp_path, monkeypatch):
    from pipelines.config_loading import apply_overrides

    (tmp_path / "other.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(load_config(None), {"data.train": [{"path": "other.jsonl"}]})
    assert cfg.data.train[0].path == str(tmp_path / "other.jsonl")


def test_global_batch_size_sets_the_accumulation_steps():
    cfg = load_config(
        None, ["optimization.global_batch_size=64", "optimization.micro_batch_size=4", "scaling.num_workers=2"]
    )
    assert (cfg.accumulation_steps, cfg.global_batch) == (8, 64)


def test_without_global_batch_size_the_accumulation_is_as_configured_or_one():
    assert load_config(None, ["optimization.gradient_accumulation_steps=3"]).accumulation_steps == 3
    assert load_config(None, ["optimization.gradient_accumulation_steps="]).accumulation_steps == 1


def test_a_global_batch_that_does_not_divide_names_all_three_keys():
    with pytest.raises(ConfigError) as err:
        load_config(
            None, ["optimization.global_batch_size=60", "optimization.micro_batch_size=4", "scaling.num_workers=4"]
        )
    for key in ("optimization.global_batch_size=60", "optimization.micro_batch_size=4", "scaling.num_workers=4"):
        assert key in str(err.value)


def test_an_accumulation_that_disagrees_with_the_global_batch_is_an_error():
    overrides = ["optimization.global_batch_size=64", "optimization.micro_batch_size=4", "scaling.num_workers=2"]
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 disagrees"):
        load_config(None, [*overrides, "optimization.gradient_accumulation_steps=2"])
    assert load_config(None, [*overrides, "optimization.gradient_accumulation_steps=8"]).accumulation_steps == 8


# --------------------------------------------------------------------------- your own data in one override


def test_data_train_takes_a_bare_path(tmp_path):
    (tmp_path / "mine.jsonl").write_text("{}\n")
    cfg = load_config(None, [f"data.train={tmp_path / 'mine.jsonl'}"])
    assert [s.path for s in cfg.data.train] == [str(tmp_path / "mine.jsonl")]


def test_data_train_takes_a_comma_separated_list_and_a_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train=a.jsonl, b/*.jsonl"])
    assert [s.path for s in cfg.data.train] == ["a.jsonl", str(tmp_path / "b" / "*.jsonl")]  # globs made absolute


def test_new_training_data_holds_out_its_own_validation_and_says_so():
    cfg = load_config(None, ["data.train=mine.jsonl"])
    assert (cfg.data.validation, cfg.data.validation_fraction) == ([], 0.05)
    assert "validation is 5% of the new training data" in cfg.notes[0]


def test_new_training_data_with_its_own_validation_keeps_it():
    cfg = load_config(None, ["data.train=mine.jsonl", "data.validation=mine_val.jsonl"])
    assert [s.path for s in cfg.data.validation] == ["mine_val.jsonl"] and cfg.notes == []
