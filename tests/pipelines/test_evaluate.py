"""`ift eval` / `ift compare`: offline lm-eval tasks, MLflow logging, model resolution, the comparison table."""

from __future__ import annotations

import os

# Everything here runs offline; set before transformers/datasets/lm-eval read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv
import json
import random
import time
from pathlib import Path

import pytest
import torch

from ift.data import pad_collate, read_jsonl, tokenize_rows
from ift.models import load_model, load_tokenizer
from ift.objectives import sft_loss
from pipelines import evaluate as ev
from pipelines.tracking import mlflow_store

REPO = Path(__file__).resolve().parents[2]
DEMO_CHAT = REPO / "pipelines" / "data" / "demo_chat.jsonl"
MODEL_NAME = "ift-tiny-eval-test"
SMALL = "4"  # --limit for tests that only check plumbing


def _untrained(seed: int = 0):
    tok = load_tokenizer("tiny")
    return load_model("tiny", tokenizer=tok, seed=seed), tok


def _register(uri: str, model, tok, method: str) -> tuple[str, str]:
    """Log ``model`` from a run tagged like a training run and register it; return (run_id, version)."""
    import mlflow

    with mlflow_store(uri):
        mlflow.set_experiment("ift")
        with mlflow.start_run() as run:
            mlflow.set_tag("method", method)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tok},
                name="model",
                task="text-generation",
                pip_requirements=["torch", "transformers"],
                registered_model_name=MODEL_NAME,
            )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient(uri)
        client.set_model_version_tag(MODEL_NAME, version, "method", method)
        return run.info.run_id, version


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite MLflow store with two registered versions (untrained tiny, seeds 0 and 1); 'champion' -> v2."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd = os.getcwd()
    os.chdir(root)  # artifacts of the default experiment land under root, not the repo
    try:
        run1, v1 = _register(uri, *_untrained(0), method="sft")
        run2, v2 = _register(uri, *_untrained(1), method="ift")
    finally:
        os.chdir(cwd)
    mlflow.MlflowClient(uri).set_registered_model_alias(MODEL_NAME, "champion", v2)
    return {"uri": uri, "root": root, "runs": {v1: run1, v2: run2}, "versions": (v1, v2)}


def _train_tiny_sft(steps: int = 600, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """SFT of the tiny preset on the bundled demo chat data: plain torch loop, ~30 s on 2 idle cores."""
    tok = load_tokenizer("tiny")
    model = load_model("tiny", tokenizer=tok, seed=seed)
    examples, _ = tokenize_rows(tok, read_jsonl(DEMO_CHAT), source=str(DEMO_CHAT), max_length=256)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = pad_collate([examples[j] for j in order[i : i + batch_size]], tok.pad_token_id)
            out = sft_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return model.eval(), tok


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        model, tok = _train_tiny_sft()
    print(f"\ntrained tiny SFT in {time.perf_counter() - t0:.1f} s")
    return model, tok


# --------------------------------------------------------------------------- offline tasks


def test_shipped_task_files_are_what_the_generator_writes():
    rows = ev.offline_task_rows()
    for name in ev.OFFLINE_TASKS:
        assert list(read_jsonl(ev.TASKS_DIR / f"{name}.jsonl")) == rows[name], (
            f"{name}.jsonl is stale: run python -m pipelines.evaluate build-tasks"
        )


def test_arithmetic_eval_problems_are_held_out_from_the_bundled_data():
    bundled = ev._bundled_questions()
    questions = [r["question"] for r in ev.offline_task_rows()["ift_arith"]]
    assert len(questions) == ev.ARITH_N == len(set(questions))
    assert not bundled & set(questions)


def test_offline_tasks_score_the_untrained_tiny_preset_within_0_and_1():
    model, tok = _untrained()
    res = ev.run_evaluation(model, tok, limit=8)
    assert set(res.scores) == {"ift_arith/exact_match", "ift_capitals_mc/acc"}
    assert all(0.0 <= v <= 1.0 for v in res.scores.values()), res.scores
    assert res.n_samples == {"ift_arith": 8, "ift_capitals_mc": 8}


def test_evaluate_model_leaves_train_mode_and_global_rng_as_they_were():
    model, tok = _untrained()
    model.train()
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    ev.evaluate_model(model, tok, tasks=["ift_capitals_mc"], limit=2)
    assert model.training
    assert torch.equal(torch.rand(3), expected_torch)
    assert random.random() == expected_py


def test_trained_tiny_beats_untrained_on_the_arithmetic_generation_task(trained):
    untrained = ev.evaluate_model(*_untrained(), tasks=["ift_arith"], limit=100)["ift_arith/exact_match"]
    after = ev.evaluate_model(*trained, tasks=["ift_arith"], limit=100)["ift_arith/exact_match"]
    print(f"\nift_arith exact_match (100 problems): untrained {untrained:.2f}, trained {after:.2f}")
    assert after >= untrained + 0.10, (untrained, after)


def test_trained_tiny_beats_untrained_on_the_capitals_multiple_choice_task(trained):
    untrained = ev.evaluate_model(*_untrained(), tasks=["ift_capitals_mc"])["ift_capitals_mc/acc"]
    after = ev.evaluate_model(*trained, tasks=["ift_capitals_mc"])["ift_capitals_mc/acc"]
    print(f"\nift_capitals_mc acc (90 questions): untrained {untrained:.2f}, trained {after:.2f}")
    assert after >= 0.8 and after >= untrained + 0.3, (untrained, after)


# --------------------------------------------------------------------------- MLflow


def test_eval_of_a_registered_version_logs_metrics_on_its_run_and_tags_the_version(store, capsys):
    import mlflow

    v1 = store["versions"][0]
    rc = ev.main_eval([f"models:/{MODEL_NAME}/{v1}", "--tracking-uri", store["uri"], "--limit", SMALL])
    out = capsys.readouterr().out
    assert rc == 0, out
    client = mlflow.MlflowClient(store["uri"])
    metrics = client.get_run(store["runs"][v1]).data.metrics
    for key in ("eval/ift_arith/exact_match", "eval/ift_capitals_mc/acc"):
        assert 0.0 <= metrics[key] <= 1.0
    tags = client.get_model_version(MODEL_NAME, v1).tags
    assert float(tags["eval.ift_capitals_mc"]) == pytest.approx(metrics["eval/ift_capitals_mc/acc"], abs=1e-4)
    assert float(tags["eval.ift_arith"]) == pytest.approx(metrics["eval/ift_arith/exact_match"], abs=1e-4)
    assert tags["eval.limit"] == SMALL
    assert store["runs"][v1] in out


def test_eval_of_a_preset_logs_to_a_new_run_in_the_eval_experiment(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/fresh.db"
    assert ev.main_eval(["tiny", "--tracking-uri", uri, "--limit", "2", "--tasks", "ift_capitals_mc"]) == 0
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(ev.EVAL_EXPERIMENT).experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["ift.model_ref"] == "tiny"
    assert "eval/ift_capitals_mc/acc" in runs[0].data.metrics


def test_alias_uri_resolves_to_the_aliased_version_and_its_method(store):
    _, _, src = ev.resolve_model(f"models:/{MODEL_NAME}@champion", tracking_uri=store["uri"])
    v2 = store["versions"][1]
    assert (src.version, src.run_id, src.method) == (v2, store["runs"][v2], "ift")


def test_missing_alias_is_a_clear_error_not_a_stack_trace(store, capsys):
    rc = ev.main_eval([f"models:/{MODEL_NAME}@nope", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"registered model '{MODEL_NAME}' has no alias 'nope'" in err
    assert store["uri"] in err and "champion" in err
    assert "Traceback" not in err


def test_missing_registered_model_is_a_clear_error_naming_the_existing_ones(store, capsys):
    rc = ev.main_eval(["models:/foo@champion", "--tracking-uri", store["uri"]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no registered model 'foo'" in err and MODEL_NAME in err


def test_missing_version_is_a_clear_error(store):
    with pytest.raises(ev.EvalError, match=f"'{MODEL_NAME}' has no version 99"):
        ev.resolve_model(f"models:/{MODEL_NAME}/99", tracking_uri=store["uri"])


def test_missing_tracking_store_is_reported_and_not_created(tmp_path):
    db = tmp_path / "nothing.db"
    with pytest.raises(ev.EvalError, match="does not exist"):
        ev.resolve_model(f"models:/{MODEL_NAME}/1", tracking_uri=f"sqlite:///{db}")
    assert not db.exists()


# --------------------------------------------------------------------------- compare


def test_compare_prints_and_writes_the_table_for_two_versions(store, tmp_path, capsys):
    v1, v2 = store["versions"]
    refs = [f"models:/{MODEL_NAME}/{v1}", f"models:/{MODEL_NAME}/{v2}"]
    out_dir = tmp_path / "cmp"
    rc = ev.main_compare([*refs, "--tracking-uri", store["uri"], "--limit", SMALL, "--out", str(out_dir), "--no-log"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with (out_dir / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["sft", "ift"]
    assert [r["model"] for r in table] == refs
    for r in table:
        scores = [float(r["ift_arith/exact_match"]), float(r["ift_capitals_mc/acc"])]
        assert float(r["average"]) == pytest.approx(sum(scores) / 2, abs=0.01)
    md = (out_dir / "comparison.md").read_text()
    assert "| Method | Model | Arithmetic (EM) | Capitals (MC) | Average |" in md
    printed = out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.startswith("Method"))
    assert printed[header + 2].startswith("sft") and printed[header + 3].startswith("ift")
    assert printed[-1] == f"results written to {out_dir / 'comparison.csv'} and {out_dir / 'comparison.md'}"


def test_comparison_table_labels_rows_by_method_and_disambiguates_repeats():
    header, cells = ev.comparison_table(
        [("sft", "models:/m/1", {"a/acc": 0.5, "b/acc": 0.25}), ("sft", "models:/m/2", {"a/acc": 1.0, "b/acc": 0.0})]
    )
    assert header == ["method", "model", "a/acc", "b/acc", "average"]
    assert cells == [
        ["sft (models:/m/1)", "models:/m/1", "50.00", "25.00", "37.50"],
        ["sft (models:/m/2)", "models:/m/2", "100.00", "0.00", "50.00"],
    ]


# --------------------------------------------------------------------------- presets


def test_paper_preset_fails_with_a_clear_message_when_the_hub_is_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = ev.main_eval(["tiny", "--preset", "paper", "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "arc_challenge, mmlu, truthfulqa_mc2, winogrande, gsm8k" in err
    assert "Hugging Face Hub" in err and "HF_HUB_OFFLINE=1" in err and "--preset offline" in err


def test_paper_preset_is_the_papers_suite_and_shots():
    assert [(t.name, t.num_fewshot) for t in ev.resolve_tasks(preset="paper")] == [
        ("arc_challenge", 25),
        ("mmlu", 5),
        ("truthfulqa_mc2", 0),
        ("winogrande", 5),
        ("gsm8k", 5),
    ]


def test_task_list_overrides_the_preset_and_accepts_shots():
    specs = ev.resolve_tasks(["ift_arith,gsm8k:3"], preset="paper")
    assert [(t.name, t.num_fewshot, t.metric) for t in specs] == [
        ("ift_arith", 0, "exact_match,final_number"),
        ("gsm8k", 3, "exact_match,strict-match"),
    ]


def test_unknown_offline_task_is_a_clear_error_naming_the_shipped_ones():
    model, tok = _untrained()
    with pytest.raises(ev.EvalError, match="unknown offline task.*ift_nope.*ift_arith, ift_capitals_mc"):
        ev.evaluate_model(model, tok, tasks=["ift_arith", "ift_nope"], limit=1)
