"""The packaged paper configs (pipelines/configs/mistral-7b-*.yaml) say what the paper and the
authors' release say: models, data, method constants, batch, checkpoints (no Ray, no network)."""

from __future__ import annotations

import socket

import pytest

from pipelines.config import TrainConfig
from pipelines.config_loading import load_config, packaged_config_names
from pipelines.training.state import Schedule
from tune.config import load_sweep

BASE = "mistralai/Mistral-7B-v0.1"
SFT_BETA = "HuggingFaceH4/mistral-7b-sft-beta"
ULTRAFEEDBACK = "hf:HuggingFaceH4/ultrafeedback_binarized"
ULTRACHAT = "hf:HuggingFaceH4/ultrachat_200k"
ULTRAFEEDBACK_ROWS = 61_135  # train_sft and train_prefs, per the dataset card
AUTHORS_GLOBAL_BATCH = 512  # batch_size=512 in the authors' commands/run_*_ift.sh
AUTHORS_CHECKPOINT_EXAMPLES = 19_968  # eval_every 20_000 rounded down to a multiple of 512 (src/train.py)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DIRECT = [f"mistral-7b-{m}" for m in ("sft", "ift", "dpo", "orpo")]
SEQUENTIAL = [f"mistral-7b-sft-beta-{m}" for m in ("sft", "ift", "dpo", "orpo")]
FULL = DIRECT + SEQUENTIAL
LORA = [f"{name}-lora" for name in FULL]
ALL = FULL + LORA


def method_of(name: str) -> str:
    return name.removesuffix("-lora").rsplit("-", 1)[1]


def is_direct(name: str) -> bool:
    return not name.startswith("mistral-7b-sft-beta-")


SINGLE_TARGET = [n for n in ALL if method_of(n) in ("sft", "ift")]
PAIRED = [n for n in ALL if method_of(n) in ("dpo", "orpo")]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loading a config must resolve every name without contacting the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("a paper config tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def train_rows(cfg: TrainConfig) -> int:
    """Rows the run plans for, from the known split sizes (UltraChat only ever capped by max_rows)."""
    rows = 0
    for src in cfg.data.train:
        rows += ULTRAFEEDBACK_ROWS if src.path == ULTRAFEEDBACK else src.max_rows
    return rows


def total_steps(cfg: TrainConfig) -> int:
    return Schedule.from_config(cfg, train_rows(cfg), cfg.scaling.num_workers).total_steps


def test_the_packaged_paper_configs_are_the_sixteen_runs():
    assert {n for n in packaged_config_names() if n.startswith("mistral-7b")} == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_paper_config_loads_by_name_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.run_name == cfg.mlflow.registered_model_name == name


@pytest.mark.parametrize("name", [n for n in ALL if is_direct(n)])
def test_direct_runs_start_from_the_base_model_with_the_sft_beta_tokenizer(name):
    model = load_config(name).model
    assert (model.name, model.tokenizer) == (BASE, SFT_BETA)


@pytest.mark.parametrize("name", [n for n in ALL if not is_direct(n)])
def test_sequential_runs_start_from_mistral_7b_sft_beta(name):
    model = load_config(name).model
    assert (model.name, model.tokenizer) == (SFT_BETA, None)


@pytest.mark.parametrize("name", [n for n in SINGLE_TARGET if is_direct(n)])
def test_direct_sft_and_ift_train_on_ultrafeedback_chosen_plus_the_first_60k_ultrachat_rows(name):
    train = [(s.path, s.split, s.max_rows, s.weight) for s in load_config(name).data.train]
    assert train == [(ULTRAFEEDBACK, "train_sft", None, 1.0), (ULTRACHAT, "train_sft", 60_000, 1.0)]


@pytest.mark.parametrize("name", [n for n in SINGLE_TARGET if not is_direct(n)])
def test_sequential_sft_and_ift_train_on_ultrafeedback_chosen_only(name):
    train = [(s.path, s.split, s.max_rows) for s in load_config(name).data.train]
    assert train == [(ULTRAFEEDBACK, "train_sft", None)]


@pytest.mark.parametrize("name", PAIRED)
def test_dpo_and_orpo_train_on_ultrafeedback_preference_pairs(name):
    cfg = load_config(name)
    assert [(s.path, s.split, s.max_rows) for s in cfg.data.train] == [(ULTRAFEEDBACK, "train_prefs", None)]
    assert [(s.path, s.split) for s in cfg.data.validation] == [(ULTRAFEEDBACK, "test_prefs")]
    assert cfg.method.paired


@pytest.mark.parametrize("name", ALL)
def test_each_config_runs_the_method_its_name_says(name):
    assert load_config(name).method.name == method_of(name)


@pytest.mark.parametrize("name", [n for n in ALL if method_of(n) == "ift"])
def test_ift_uses_the_papers_lambda_and_decay(name):
    method = load_config(name).method
    assert (method.lam, method.decay, method.lam_schedule) == (0.2, 0.95, "constant")


@pytest.mark.parametrize("name", PAIRED)
def test_dpo_and_orpo_use_the_papers_betas(name):
    method = load_config(name).method
    expected = {"dpo": 0.1, "orpo": 0.25}[method_of(name)]
    assert method.beta == expected


@pytest.mark.parametrize("name", FULL)
def test_full_runs_use_zero3_in_bf16_with_gradient_checkpointing_on_8_gpus(name):
    cfg = load_config(name)
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.model.dtype) == (3, "bf16", "bfloat16")
    assert cfg.model.gradient_checkpointing and cfg.model.lora is None
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.gpus_per_worker) == (8, True, 1)


@pytest.mark.parametrize("name", FULL)
def test_full_runs_use_the_authors_optimisation_values(name):
    cfg = load_config(name)
    o = cfg.optimization
    assert (o.lr, o.epochs, o.warmup_ratio, o.weight_decay, o.max_grad_norm, o.seed) == (5e-7, 3, 0.15, 0.0, 10.0, 0)
    assert cfg.data.max_length == 1024 and cfg.data.truncation == "truncate_right"


@pytest.mark.parametrize("name", ALL)
def test_the_schedule_is_cosine_for_single_target_methods_and_linear_for_pairs(name):
    expected = "linear" if name in PAIRED else "cosine"
    assert load_config(name).optimization.schedule == expected


@pytest.mark.parametrize("name", ALL)
def test_global_batch_is_the_authors_512(name):
    cfg = load_config(name)
    o = cfg.optimization
    assert o.global_batch_size == cfg.global_batch == AUTHORS_GLOBAL_BATCH
    assert o.micro_batch_size * cfg.accumulation_steps * cfg.scaling.num_workers == AUTHORS_GLOBAL_BATCH


GPU_BYTES = 80e9  # the A100/H100 80 GB the packaged clusters carry
HEADROOM = 0.5  # the estimate is a floor: CUDA context, NCCL buffers, fragmentation and temporaries come on top
MAX_WORKERS = 32  # the configs must keep the global batch on 8, 16 and 32 GPUs


@pytest.mark.parametrize("name", ALL)
def test_the_micro_batch_is_the_largest_power_of_two_the_dry_run_fits_in_half_an_80gb_gpu(name):
    from pipelines.training.estimate import estimate_memory, model_shape

    cfg = load_config(name)
    micro, shape = cfg.optimization.micro_batch_size, model_shape(cfg)

    def estimate(micro: int) -> float:
        sized = load_config(name, [f"optimization.micro_batch_size={micro}"])
        return estimate_memory(sized, shape, use_gpu=True).gpu_total

    assert micro & (micro - 1) == 0
    assert estimate(micro) <= HEADROOM * GPU_BYTES
    assert estimate(2 * micro) > HEADROOM * GPU_BYTES or 2 * micro * MAX_WORKERS > AUTHORS_GLOBAL_BATCH


@pytest.mark.parametrize("name", ["mistral-7b-ift", "mistral-7b-dpo"])
@pytest.mark.parametrize("workers", [16, 32])
def test_more_gpus_keep_the_global_batch_and_the_optimizer_steps(name, workers):
    on_8 = load_config(name)
    wider = load_config(name, [f"scaling.num_workers={workers}"])
    assert wider.global_batch == on_8.global_batch == AUTHORS_GLOBAL_BATCH
    assert wider.accumulation_steps == on_8.accumulation_steps * 8 // workers
    rows = 120_000
    steps_on_8, steps_wider = Schedule.from_config(on_8, rows, 8), Schedule.from_config(wider, rows, workers)
    assert (steps_wider.steps_per_epoch, steps_wider.total_steps) == (
        steps_on_8.steps_per_epoch,
        steps_on_8.total_steps,
    )


@pytest.mark.parametrize("name", ALL)
def test_checkpoints_come_every_20k_training_examples_as_the_authors_count_them(name):
    cfg = load_config(name)
    assert cfg.checkpointing.every_n_steps * AUTHORS_GLOBAL_BATCH == AUTHORS_CHECKPOINT_EXAMPLES
    assert cfg.optimization.eval_every_n_steps == cfg.checkpointing.every_n_steps


@pytest.mark.parametrize("name", ALL)
def test_every_checkpoint_is_kept_so_the_best_can_be_chosen(name):
    cfg = load_config(name)
    periodic = total_steps(cfg) // cfg.checkpointing.every_n_steps
    assert cfg.checkpointing.keep == periodic + 1  # + the final checkpoint


def test_three_epochs_are_708_steps_direct_and_357_sequential_or_paired():
    assert total_steps(load_config("mistral-7b-ift")) == 708
    assert total_steps(load_config("mistral-7b-sft-beta-ift")) == 357
    assert total_steps(load_config("mistral-7b-dpo")) == 357


@pytest.mark.parametrize("name", ALL)
def test_each_scenario_tracks_its_runs_in_one_experiment(name):
    expected = "ift-paper-mistral-7b" if is_direct(name) else "ift-paper-mistral-7b-sft-beta"
    assert load_config(name).mlflow.experiment == expected


@pytest.mark.parametrize("name", LORA)
def test_lora_variants_train_adapters_on_every_projection_with_the_handbook_values(name):
    lora = load_config(name).model.lora
    assert lora is not None
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 16.0, 0.05, ALL_PROJECTIONS)


@pytest.mark.parametrize("name", LORA)
def test_lora_variants_use_the_handbook_learning_rate(name):
    expected = 5e-6 if name in PAIRED else 2e-4
    assert load_config(name).optimization.lr == expected


@pytest.mark.parametrize("name", LORA)
def test_lora_variants_differ_from_their_full_run_only_in_adapters_lr_zero_stage_and_names(name):
    lora, full = load_config(name).model_dump(), load_config(name.removesuffix("-lora")).model_dump()
    assert lora["deepspeed"]["zero_stage"] == 2
    for tree in (lora, full):
        del tree["model"]["lora"], tree["optimization"]["lr"], tree["deepspeed"]["zero_stage"]
        del tree["run_name"], tree["mlflow"]["registered_model_name"]
    assert lora == full


def test_the_ift_sweep_grids_lambda_and_decay_around_the_paper_setting():
    sweep, base = load_sweep("mistral-7b-ift-sweep")
    space = sweep.space()
    assert sweep.algorithm == "grid" and set(space) == {"method.lam", "method.decay"}
    assert space["method.lam"].grid_values() == [0.1, 0.2, 0.3]
    assert space["method.decay"].grid_values() == [0.9, 0.95, 1.0]


def test_the_ift_sweep_runs_the_direct_ift_config_for_one_epoch_and_ranks_by_validation_nll():
    sweep, base = load_sweep("mistral-7b-ift-sweep")
    assert (base.model.name, base.method.name, base.optimization.epochs) == (BASE, "ift", 1)
    assert (sweep.metric, sweep.mode, sweep.scheduler.type) == ("val_nll", "min", "asha")
    assert base.data.validation and base.optimization.eval_every_n_steps == 20
    assert sweep.registered_model_name == "mistral-7b-ift-sweep"
