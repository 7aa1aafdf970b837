"""Next-token training: data, the step on the actor graph vs one process, checkpoints, resume, Ray Jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jobs.config import Schedule, load_config
from jobs.data import (
    ArithConfig,
    DataConfig,
    Sample,
    TrainingData,
    arith_records,
    arith_split,
    pack,
    read_records,
    shifted_labels,
    tokenize_record,
    write_records,
)
from jobs.trainer import step_seed
from model import DeepseekV2ForCausalLM
from model.checkpoint import load_tensors, tensor_files
from model.tokenizer import ChatTokenizer
from model.training import IGNORE_INDEX

from .local_ray import ray_head
from .training_helpers import (
    ENV,
    REPO,
    SMOKE,
    assert_transformers_loads,
    init_folder,
    smoke_config,
    straight_and_killed,
    submit_job,
)

@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer.bundled(128)


# ---- tokenizer and data (no Ray) ------------------------------------------------------------------


def test_bundled_tokenizer_round_trips_and_matches_transformers(tokenizer, tmp_path):
    import transformers

    messages = [{"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "85"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == "<bos><|user|>What is 37 + 48?<|assistant|>85<eos>"
    assert tokenizer.decode(tokenizer.encode("What is 7 - 19? Hello!")) == "What is 7 - 19? Hello!"
    tokenizer.save_pretrained(tmp_path)
    loaded = ChatTokenizer.from_pretrained(tmp_path)
    assert loaded.encode_chat(messages) == tokenizer.encode_chat(messages)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(messages, tokenize=False) == text
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode(text)


def test_chat_loss_mask_covers_assistant_tokens_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "What is 3 * 3?"},
        {"role": "assistant", "content": "9"},
    ]
    ids, mask = tokenizer.encode_chat_with_mask(messages)
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == "4<eos>9<eos>"
    assert tokenizer.encode_chats_with_masks([messages]) == [(ids, mask)]
    sample = tokenize_record({"messages": messages}, tokenizer, "chat")
    assert sample.labels == shifted_labels(ids, mask)
    assert [t for t in sample.labels if t != IGNORE_INDEX] == [t for t, m in zip(ids, mask) if m]


def test_pretraining_text_learns_every_token_and_long_texts_are_cut(tokenizer):
    sample = tokenize_record({"text": "abc"}, tokenizer, "text")
    assert sample.ids[0] == tokenizer.bos_token_id and sample.ids[-1] == tokenizer.eos_token_id
    assert sample.labels == sample.ids[1:] + [IGNORE_INDEX]
    ids, labels = pack([tokenize_record({"text": "x" * 30}, tokenizer, "text")], seq_len=8, pad_id=0)
    assert ids.shape == (4, 8)  # 32 tokens; the last token of a piece still predicts the next piece's first
    assert int((labels != IGNORE_INDEX).sum()) == 31 and labels[0, -1] == ids[1, 0]


def test_packing_fills_rows_and_never_learns_across_samples():
    samples = [Sample([1, 10 + i, 11 + i, 2], shifted_labels([1, 10 + i, 11 + i, 2], [False, False, True, True])) for i in range(5)]
    ids, labels = pack(samples, seq_len=10, pad_id=0, packing=True)
    assert ids.shape == (3, 10)  # 2 + 2 + 1 samples of 4 tokens
    assert ids[0].tolist() == [1, 10, 11, 2, 1, 11, 12, 2, 0, 0]
    no = IGNORE_INDEX
    assert labels[0].tolist() == [no, 11, 2, no, no, 12, 2, no, no, no]
    assert int((labels != IGNORE_INDEX).sum()) == 10
    unpacked, _ = pack(samples, seq_len=10, pad_id=0, packing=False)
    assert unpacked.shape == (5, 10)


def test_jsonl_and_parquet_records_train_the_same_rows(tokenizer, tmp_path):
    arith = ArithConfig(max_operand=9)
    records = arith_records(arith, "train")
    assert len(records) + len(arith_split(arith)["heldout"]) == 100 + 55  # a - b only when a >= b
    heldout = {m[0]["content"] for m in (r["messages"] for r in arith_records(arith, "heldout"))}
    assert not heldout & {r["messages"][0]["content"] for r in records}
    rows = {}
    for suffix in ("jsonl", "parquet"):
        path = tmp_path / f"train.{suffix}"
        write_records(records, path)
        assert read_records(path) == records
        data = TrainingData(DataConfig(source="file", path=str(path)), tokenizer, seq_len=32, seed=3)
        rows[suffix] = next(data.batches(4))
    data = TrainingData(DataConfig(arith=arith), tokenizer, seq_len=32, seed=3)
    for got in rows.values():
        expected = next(data.batches(4))
        assert all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))


def test_data_position_resumes_the_same_batches(tokenizer):
    data = TrainingData(DataConfig(arith=ArithConfig(max_operand=6)), tokenizer, seq_len=24, seed=0)
    rows_per_epoch = len(data.epoch(0)[0])
    stream = data.batches(7)
    batches = [next(stream) for _ in range(2 * rows_per_epoch // 7 + 2)]  # crosses epochs
    for k in (1, 5, len(batches) - 2):
        ids, labels, position = next(data.batches(7, batches[k - 1][2]))
        assert torch.equal(ids, batches[k][0]) and torch.equal(labels, batches[k][1]) and position == batches[k][2]


def test_schedules():
    v2 = Schedule(kind="v2_step", lr=1.0, warmup_steps=10, decay_at=[0.6, 0.9], decay_factor=0.316)
    assert v2.lr_at(0, 100) == pytest.approx(0.1) and v2.lr_at(9, 100) == pytest.approx(1.0)
    assert v2.lr_at(59, 100) == 1.0 and v2.lr_at(60, 100) == pytest.approx(0.316)
    assert v2.lr_at(95, 100) == pytest.approx(0.316**2)
    cosine = Schedule(kind="cosine", lr=1.0, warmup_steps=0, min_lr_ratio=0.1)
    assert cosine.lr_at(0, 100) == 1.0 and cosine.lr_at(100, 100) == pytest.approx(0.1)


def test_config_overrides_and_validation():
    config = load_config(SMOKE, ["steps=3", "schedule.lr=0.5", "moe.capacity_factor=null"])
    assert config.steps == 3 and config.schedule.lr == 0.5 and config.moe.capacity_factor is None
    with pytest.raises(ValueError):
        load_config(SMOKE, ["batch_size=7", "routers=2"])
    with pytest.raises(ValueError):
        load_config(SMOKE, ["no_such_key=1"])
    assert load_config(SMOKE, ["router_cpu_threads=2"]).router_cpu_threads == 2
    with pytest.raises(ValueError):
        load_config(SMOKE, ["router_cpu_threads=0"])


def test_rng_states_are_saved_as_tensors_and_restore_the_same_draws(tmp_path):
    import random

    from jobs.trainer import load_rng_states, save_rng_states

    random.gauss(0, 1)  # leaves a cached second normal in Python's state: it must survive too
    routers = [torch.Generator().manual_seed(rank).get_state() for rank in range(2)]
    save_rng_states(tmp_path / "rng.pt", routers)
    expected = (torch.rand(4), random.random(), random.gauss(0, 1))
    torch.manual_seed(123)
    random.seed(123)
    restored = load_rng_states(tmp_path / "rng.pt")
    assert torch.equal(torch.rand(4), expected[0]) and (random.random(), random.gauss(0, 1)) == expected[1:]
    assert all(torch.equal(a, b) for a, b in zip(restored, routers)) and len(restored) == 2
    assert all(isinstance(t, torch.Tensor) for t in torch.load(tmp_path / "rng.pt", weights_only=True).values())


# ---- one step: the actor graph vs one process ------------------------------------------------------


def reference_step(folder: Path, config: TrainConfig, input_ids, labels, lr: float, ranks: int):
    """The step in one process, written out plainly: the batch in `ranks` micro-batches (each with its
    rank's token-dropping seed) accumulated into token-mean CE + mean balance losses, clip, then one
    AdamW over all parameters (decay on matrices only)."""
    model = DeepseekV2ForCausalLM.from_pretrained(folder).train()
    for p in model.parameters():
        p.requires_grad_(True)
    n_learned = (labels != IGNORE_INDEX).sum()
    total = 0.0
    for rank, (ids, lab) in enumerate(zip(input_ids.chunk(ranks), labels.chunk(ranks))):
        torch.manual_seed(step_seed(config.seed, 0, rank))
        out = model(ids)
        ce_sum = F.cross_entropy(out.logits.flatten(0, 1), lab.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        loss = ce_sum / n_learned + sum(out.balance_losses.values()) / ranks
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=config.betas, eps=config.eps,
    )
    optimizer.step()
    return total, {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.timeout(400)
def test_one_step_on_the_actor_graph_equals_one_process(ray_cluster, tmp_path):
    """2 routers (data-parallel ranks, averaging their dense gradients by all-reduce) x 2 expert actors,
    balance losses, token dropping and clipping on."""
    import ray
    import safetensors.torch

    from jobs.trainer import GraphTrainer

    ranks = 2
    config = smoke_config(tmp_path, f"routers={ranks}", "expert_actors=2")
    assert config.moe.capacity_factor is not None and config.moe.alpha2
    folder = init_folder(config, tmp_path / "init")
    tokenizer = ChatTokenizer.from_pretrained(folder)
    input_ids, labels, _ = next(TrainingData(config.data, tokenizer, config.seq_len, config.seed).batches(config.batch_size))
    lr = 3e-3
    expected_loss, expected = reference_step(folder, config, input_ids, labels, lr, ranks)

    trainer = GraphTrainer(config, folder, name="train-equivalence")
    try:
        metrics = trainer.step(0, input_ids, labels, lr)
        out = tmp_path / "after"
        out.mkdir()
        trainer.save(out)
        rank_1 = ray.get(trainer.routers[1].save_dense.remote(str(tmp_path / "rank-1.safetensors")))
    finally:
        trainer.close()
    assert metrics["grad_norm"] > config.grad_clip  # the clip is exercised
    assert metrics["dropped_fraction"] > 0  # so is token dropping
    assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-5)
    assert set(metrics["seconds"]) == {"forward", "backward", "expert_send", "expert_wait", "update"}
    assert metrics["seconds"]["expert_wait"] > 0 and min(metrics["seconds"].values()) >= 0
    got = load_tensors(out, tensor_files(out))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(tensor, load_tensors(folder, [name])[name]) or tensor.dim() == 1, f"{name} did not move"
    for name, tensor in safetensors.torch.load_file(tmp_path / "rank-1.safetensors").items():  # the ranks agree
        assert torch.equal(tensor, got[name]), name
    assert set(rank_1) == set(safetensors.torch.load_file(out / "model-dense.safetensors"))


@pytest.mark.timeout(300)
def test_bf16_autocast_tracks_fp32_in_one_process_and_on_the_graph(ray_cluster, tmp_path):
    from jobs.trainer import GraphTrainer, LocalTrainer

    config = smoke_config(tmp_path, "expert_actors=2", "moe.capacity_factor=null")
    folder = init_folder(config, tmp_path / "init")
    data = TrainingData(config.data, ChatTokenizer.from_pretrained(folder), config.seq_len, config.seed)
    input_ids, labels, _ = next(data.batches(config.batch_size))
    bf16 = config.model_copy(update={"dtype": "bfloat16"})
    fp32_loss = LocalTrainer(config, folder).step(0, input_ids, labels, 1e-3)["loss"]
    local_loss = LocalTrainer(bf16, folder).step(0, input_ids, labels, 1e-3)["loss"]
    graph = GraphTrainer(bf16, folder, name="train-bf16")
    try:
        graph_loss = graph.step(0, input_ids, labels, 1e-3)["loss"]
    finally:
        graph.close()
    assert local_loss == pytest.approx(fp32_loss, rel=2e-2)
    assert graph_loss == pytest.approx(local_loss, rel=1e-2)


# ---- whole runs: kill -9 and resume; Ray Jobs ------------------------------------------------------


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.timeout(420)
def test_kill_9_then_resume_matches_an_uninterrupted_run(ray_cluster, tmp_path):
    env = {**ENV, "RAY_ADDRESS": ray_cluster}
    common = ["--steps", "24", "--set", "checkpoint_every=4", "--set", "plot=false"]
    straight_and_killed("jobs.sft", SMOKE, common, tmp_path, env, kill_after=4, steps=24, timeout_s=300)
    killed_dir = tmp_path / "killed"
    straight, interrupted = losses(tmp_path / "straight"), losses(killed_dir)
    assert [s for s, _ in interrupted] == list(range(1, 25))
    for (step, a), (_, b) in zip(straight, interrupted):
        assert a == pytest.approx(b, abs=1e-6), f"step {step}"
    final = load_tensors(killed_dir / "checkpoint-24", tensor_files(killed_dir / "checkpoint-24"))
    for name, tensor in load_tensors(tmp_path / "straight" / "checkpoint-24", final).items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_and_transformers_loads_the_checkpoint(tmp_path):
    """A real `ray start --head` cluster with its dashboard (tests/local_ray.py), `ray job submit --working-dir .`."""
    run_dir = tmp_path / "job-run"
    with ray_head(ENV, REPO) as head:
        submit_job(head, ["python", "-m", "jobs.sft", "--config", "jobs/configs/smoke.yaml", "--run-dir", str(run_dir)])

    checkpoint = run_dir / "checkpoint-6"
    assert (run_dir / "latest").read_text().strip() == "checkpoint-6"
    assert not list(run_dir.glob("*.tmp"))
    files = set(json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert files == {"model-dense.safetensors", "model-experts-00000.safetensors", "model-experts-00001.safetensors"}
    assert (run_dir / "training.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "ce", "balance_expert", "balance_device", "balance_comm", "dropped_fraction", "tokens_per_s", "expert_load"} <= set(records[0])
    assert_transformers_loads(checkpoint)


def test_moeray_train_sft_runs_the_job_in_one_process(tmp_path):
    from cli.main import main

    run_dir = tmp_path / "cli-run"
    assert main(["train", "sft", "--config", str(SMOKE), "--expert-actors", "0", "--steps", "2",
                 "--run-dir", str(run_dir), "--set", "plot=false"]) == 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 2 * 8


def test_training_shows_progress_and_writes_eval_json_by_default(tmp_path, capsys):
    from cli.main import main

    run_dir = tmp_path / "smoke"
    assert main(["train", "sft", "--config", str(SMOKE), "--expert-actors", "0", "--run-dir", str(run_dir),
                 "--set", "plot=false"]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[jobs.sft] step ")]
    assert [line.split()[2].rstrip(",") for line in progress] == [f"{step}/6" for step in range(1, 7)]
    assert ", ce " in progress[-1] and "loss" in progress[-1] and "left" in progress[-1]  # ce: the task alone
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["n"] == 20 and 0 <= evaluation["exact_match"] <= 1


def test_progress_is_a_bar_on_a_terminal_and_a_line_every_few_steps_in_a_log():
    import contextlib
    import fcntl
    import io
    import pty
    import struct
    import termios

    from jobs.progress import LINES_PER_RUN, Progress

    log = io.StringIO()
    progress = Progress("job", 200, initial=40, stream=log)
    for step in range(41, 201):
        progress.update(step, loss=0.5)
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == LINES_PER_RUN and lines[-1].startswith("[job] step 200/200, loss 0.5,")

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with open(terminal, "w") as stream:
        progress = Progress("job", 3, stream=stream)
        for step in (1, 2, 3):
            progress.update(step, loss=0.25)
        progress.close()
    shown = b""
    with open(controller, "rb", buffering=0) as screen, contextlib.suppress(OSError):  # EIO: all read, pty closed
        while chunk := screen.read(4096):
            shown += chunk
    assert all(part in shown.decode() for part in ("job: 100%", "3/3", "loss=0.25")), shown
