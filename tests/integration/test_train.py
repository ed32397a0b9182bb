"""`distill-ray train` on a real local Ray: 2 CPU workers, DeepSpeed ZeRO, a tiny Llama student.

The filtered set comes from the real steps (prompt set, a scripted teacher on 127.0.0.1, filter).
The student is a 4-layer Llama built here (seconds to train); layer dropping keeps 2 of its layers.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from ray.util.state import list_actors
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_ray.cli import main
from distill_ray.storage import Workdir
from tests.helpers.steps import train_config as _config

pytestmark = pytest.mark.usefixtures("ray_local")


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "students" / "mini" / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_zero2_layer_dropped_student(filtered, student_folder, tmp_path, capsys):
    path = _config(tmp_path, filtered, student_folder)
    assert main(["train", str(path)]) == 0
    workdir = tmp_path / "run"
    history = _metrics(workdir)
    assert len(history) >= 3 and [r["step"] for r in history][:3] == [4, 8, 12]  # an eval every 4 steps
    assert history[-1]["holdout_loss"] < history[0]["holdout_loss"] * 0.8  # it learns the teacher's answers
    assert all(r["tokens_per_s"] > 0 for r in history)

    init = json.loads((workdir / "students" / "mini" / "init" / "distill_ray_init.json").read_text())
    assert init["kept_layers"] == [0, 2, 3] and init["layers"] == "3 of 4"
    best = workdir / "students" / "mini" / "best"
    model = AutoModelForCausalLM.from_pretrained(best)
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert model.config.num_hidden_layers == 3
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "where is ORD-100001?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert (workdir / "students" / "mini" / "last" / "model.safetensors").exists()

    out_text = capsys.readouterr().out
    assert "students compared" in out_text and "mini" in out_text
    manifest = json.loads((workdir / "students" / "mini" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["result"]["best_step"] in [r["step"] for r in history]

    # A rerun after success does nothing.
    assert main(["train", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert len(_metrics(workdir)) == len(history)
    # Changed settings: a new run from the start, not a resume from the old run's checkpoint.
    assert main(["train", str(path), "-o", "train.max_steps=2", "-o", "train.eval_every_steps=2"]) == 0
    assert "changed since the last run: starting over" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(workdir)] == [2]


def _train_workers() -> set[str]:
    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)}


def _registered_step(run: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (the one a restart resumes from), 0 if none."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return 0


def _train_killing_a_worker(path: Path, workdir: Path, *args: str) -> tuple[int | None, float]:
    """Run `distill-ray train` in a thread; as soon as Ray Train has registered a checkpoint newer than the
    ones already there, SIGKILL one of its training workers. Returns the exit code and when the kill happened."""
    import os
    import signal

    before = _train_workers()
    run = workdir / "students" / "mini" / "ray" / "run"
    registered = _registered_step(run)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(["train", str(path), *args])))
    thread.start()
    deadline = time.monotonic() + 240
    while _registered_step(run) <= registered:
        assert thread.is_alive() and time.monotonic() < deadline, "no new checkpoint before the run ended"
        time.sleep(0.05)
    alive = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
             if a.actor_id not in before]
    assert alive, "no training worker to kill"
    os.kill(alive[0].pid, signal.SIGKILL)
    killed_time = time.time()
    thread.join(timeout=300)
    return result.get("rc"), killed_time


@pytest.mark.slow  # three worker groups start (about 100 s here)
def test_a_killed_worker_fails_a_run_without_restarts_and_is_restarted_in_one_with_them(filtered, student_folder,
                                                                                       tmp_path):
    """max_failures 0: a killed worker fails the run (exit 1, no export). `distill-ray train` again, now with
    max_failures 2 (how a run copes with a crash: not a new run), resumes from the last checkpoint; a worker
    killed again after its next checkpoint, Ray Train restarts the group from there and the run completes.
    Every resume carries the evals from before the kill over. Each kill lands right after a checkpoint is
    registered, 4 or 8 steps into a run of 24."""
    path = _config(tmp_path, filtered, student_folder, epochs=30, max_steps=24, max_failures=0)
    workdir = tmp_path / "run"
    before = _train_workers()
    rc, first_kill = _train_killing_a_worker(path, workdir)
    assert rc == 1  # the step failed
    assert not (workdir / "students" / "mini" / "manifest.json").exists()
    assert len(_train_workers() - before) == 2  # no restart
    rc, second_kill = _train_killing_a_worker(path, workdir, "-o", "train.max_failures=2")
    assert rc == 0
    assert len(_train_workers() - before) == 6  # the failed run's group, the rerun's, its restart
    history = _metrics(workdir)
    steps = [r["step"] for r in history]
    assert steps == list(range(4, 25, 4))  # resumed, not restarted: every eval once, from the first
    assert history[0]["unix_time"] < first_kill < second_kill < history[-1]["unix_time"]
    assert (workdir / "students" / "mini" / "manifest.json").exists()


@pytest.mark.parametrize(("override", "message"), [
    (["filters=[{kind: regex, pattern: '^NEVER$'}]"], "keeps no training rows"),
    (["train.deepspeed.zero_stage=5"], "train.deepspeed.zero_stage"),
    (["students.0.base_model=/no/such/model"], "students.mini.base_model"),
    (["train.max_seq_len=16"], "train.max_seq_len"),
    (["train.deepspeed.preset=zero9"], "train.deepspeed.preset"),
])
def test_bad_inputs_stop_before_any_worker_starts(filtered, student_folder, tmp_path, capsys, override, message):
    path = _config(tmp_path, filtered, student_folder)
    if override[0].startswith("filters="):
        assert main(["filter", str(path), "-o", override[0]]) == 0
        override = []
    before = _train_workers()
    assert main(["train", str(path), *[a for o in override for a in ("-o", o)]]) == 2
    assert message in capsys.readouterr().err
    assert _train_workers() == before
    assert not (tmp_path / "run" / "students" / "mini" / "ray").exists()


def test_logit_distillation_from_a_teacher_with_the_students_tokenizer(prompt_set, student_folder, tmp_path,
                                                                      capsys):
    """The teacher is the offline server running a model with the student's tokenizer, so every
    answer token has the teacher's top-k as targets."""
    import shutil
    import socket

    from tests.helpers.models import tiny_model

    teacher_dir = tmp_path / "teacher-model"
    tokenizer = AutoTokenizer.from_pretrained(student_folder)
    tiny_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = tmp_path / "source"
    shutil.copytree(prompt_set / "prompts", source / "prompts")
    path = _config(tmp_path, source, student_folder, logit_distillation=True, kd_weight=0.5, max_steps=4)
    config = json.loads(path.read_text())
    # The transformers engine: the same OpenAI server and logprobs as vLLM's for this, started in seconds.
    config["teachers"] = [{"name": "smollm2", "base_url": f"http://127.0.0.1:{port}/v1", "model": "tiny",
                           "launch": str(teacher_dir), "max_tokens": 6, "top_logprobs": 3, "max_concurrency": 8,
                           "engine": {"backend": "transformers"}}]
    config["filters"] = []
    path.write_text(json.dumps(config))
    assert main(["run", str(path), "--steps", "generate,filter,train"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "logit distillation on" in x)
    with_targets, total = (int(w) for w in line.split("logit distillation on ")[1].split(" rows")[0].split(" of "))
    # A random tiny teacher also emits partial UTF-8 bytes, whose text is no student token (vLLM shows a
    # byte that ends no character as "", and the character on the token that completes it): those rows
    # train with plain SFT; every other row gets the teacher's top-k as targets.
    rows = Workdir(str(tmp_path / "run")).read_table("filtered", "rows").to_pylist()
    clean = [r for r in rows if r["split"] == "train" and r["kept"]
             and not any(t == "" or "\ufffd" in t for t in r["tokens"])]
    assert total > 0 and with_targets == len(clean) > 0
    assert _metrics(tmp_path / "run")[-1]["step"] == 4


def test_zero3_checkpoints_and_exports_go_to_an_s3_workdir(filtered, student_folder, tmp_path, s3_bucket):
    """ZeRO-3 under Ray Train (zero.Init, weights gathered to rank 0's CPU for the export, the eval on a
    transient load of it), with the run's checkpoints and exports on S3."""
    from distill_ray.models import load_causal_lm
    from distill_ray.train.students import upload_folder

    uri = f"s3://{s3_bucket}/runs/x"
    for step in ("prompts", "teacher", "filtered"):
        upload_folder(str(filtered / step), Workdir(uri), step)
    path = _config(tmp_path, filtered, student_folder, max_steps=4, eval_every_steps=2, deepspeed={"zero_stage": 3})
    config = json.loads(path.read_text())
    config["workdir"] = uri
    path.write_text(json.dumps(config))
    assert main(["train", str(path)]) == 0
    workdir = Workdir(uri)
    history = [json.loads(x) for x in workdir.read_bytes("students", "mini", "metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in history] == [2, 4]
    assert workdir.read_json("students", "mini", "manifest.json")["status"] == "complete"
    assert any(name.startswith("run/checkpoint_") for name in workdir.list_files("students", "mini", "ray"))
    model, _ = load_causal_lm(workdir.uri_of("students", "mini", "best"))
    assert model.config.num_hidden_layers == 3
    assert history[-1]["model_elements_on_rank"] <= history[-1]["model_elements"] / 2 + 64  # each rank its half
    assert history[-1]["holdout_loss"] < 6.0 and history[-1]["train_loss"] is not None


def test_a_bundle_trains_the_student_without_ray(filtered, student_folder, tmp_path, capsys):
    """`distill-ray train --bundle DIR` writes the loop's settings and rows, starting no worker; the loop then
    runs from them in a process where `import ray` fails, and exports where `distill-ray train` would."""
    from tests.helpers.processes import run_without_ray as _without_ray

    path = _config(tmp_path, filtered, student_folder, max_steps=2, eval_every_steps=2)
    before = _train_workers()
    assert main(["train", str(path), "--bundle", str(tmp_path / "bundle")]) == 0
    assert "python -m distill_ray.train.standalone" in capsys.readouterr().out
    assert _train_workers() == before
    bundle = tmp_path / "bundle" / "mini"
    loop = json.loads((bundle / "loop.json").read_text())
    rows = (bundle / "train.jsonl").read_text().splitlines()
    assert loop["total_steps"] == 2 and len(rows) >= loop["global_batch"] and json.loads(rows[0])["labels"]
    # One process for the 2 workers the config plans: the same global batch as one rank.
    loop.update({"micro_batch": loop["global_batch"], "deepspeed": {**loop["deepspeed"],
                 "train_micro_batch_size_per_gpu": loop["global_batch"]}})
    (bundle / "loop.json").write_text(json.dumps(loop))
    _without_ray(tmp_path, ["-m", "distill_ray.train.standalone", str(bundle)])
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [2]
    assert (tmp_path / "run" / "students" / "mini" / "best" / "model.safetensors").exists()
