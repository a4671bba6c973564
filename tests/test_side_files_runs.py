"""Hostile and careless files around the server: an adapter's side files that link out of its
directory, run directories and metrics / samples files the runs view must read without
stalling or hiding rows, and a non-finite or absurd lora_alpha on every path that reads it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import adapter_on_tiny_base, make_serve_adapter
from lorakit.adapters.files import read_adapter
from lorakit.cli import main
from lorakit.serve import ui
from lorakit.serve.api import create_app
from lorakit.serve.ui import mount_ui
from test_serve_api import Server
from test_serve_engine import PROMPTS, greedy, make_engine
from test_serve_ui import BASE, write_jsonl

SECRET = "hunter2-not-for-clients"


@pytest.fixture(scope="module")
def engine(serve_adapter_dirs):
    engine = make_engine({"alpha": serve_adapter_dirs["alpha"]}).start()
    yield engine
    engine.stop()


def client_for(engine, adapter_roots=(), runs=()) -> TestClient:
    app = create_app(engine, model_name=BASE, adapter_roots=list(adapter_roots))
    mount_ui(app, engine, model_name=BASE, runs=list(runs))
    return TestClient(app)


def copy_adapter(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def secrets(tmp_path: Path) -> dict[str, Path]:
    """Files outside every root that an adapter's side file may try to point at."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jinja").write_text(f"{SECRET} {{{{ messages }}}}")
    (outside / "secret.json").write_text(json.dumps({"chat_template": SECRET, "password": SECRET}))
    return {"chat_template.jinja": outside / "secret.jinja", "tokenizer_config.json": outside / "secret.json",
            "chat_template.json": outside / "secret.json"}


# 4: an adapter's side files stay inside its directory ----------------------------------------


@pytest.mark.parametrize("side_file", ["chat_template.jinja", "tokenizer_config.json", "adapter_model.safetensors"])
def test_an_adapter_with_a_file_linking_out_is_not_loaded_by_path(engine, serve_adapter_dirs, tmp_path, side_file):
    root = tmp_path / "root"
    adapter = copy_adapter(serve_adapter_dirs["beta"], root / "beta")
    targets = secrets(tmp_path)
    # Weights linked to another adapter's, outside the adapter's directory but inside the root.
    targets["adapter_model.safetensors"] = copy_adapter(serve_adapter_dirs["gamma"], root / "gamma") / side_file
    (adapter / side_file).unlink(missing_ok=True)
    (adapter / side_file).symlink_to(targets[side_file])
    client = client_for(engine, adapter_roots=[root])

    try:
        reply = client.post("/v1/adapters", json={"name": "beta", "path": "beta"})
    finally:
        if "beta" in engine.adapter_names():  # (loaded: the test fails below; the next one starts clean)
            engine.unload_adapter("beta")
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "path"
    assert error["message"] == (
        f"adapter directory 'beta': {side_file} is a link to a file outside it; every file of an adapter "
        "served here must lie inside its directory (copy the file in instead of linking it)"
    )
    assert "beta" not in engine.adapter_names()
    listing = client.get("/v1/adapters")
    assert SECRET not in listing.text
    # The server goes on serving, and the same adapter with its own file loads.
    (adapter / side_file).unlink()
    if side_file == "adapter_model.safetensors":
        shutil.copy(serve_adapter_dirs["beta"] / side_file, adapter / side_file)
    assert client.post("/v1/adapters", json={"name": "beta", "path": "beta"}).status_code == 201
    assert client.delete("/v1/adapters/beta").status_code == 200


@pytest.mark.parametrize("side_file", ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"])
def test_the_adapters_listing_never_reads_a_side_file_that_links_out(engine, serve_adapter_dirs, tmp_path, side_file):
    # Loaded with its own files, then one of them swapped for a link to a file outside.
    adapter = copy_adapter(serve_adapter_dirs["beta"], tmp_path / "beta")
    engine.load_adapter("beta", adapter)
    try:
        (adapter / side_file).symlink_to(secrets(tmp_path)[side_file])
        reply = client_for(engine).get("/v1/adapters")
    finally:
        engine.unload_adapter("beta")
    assert reply.status_code == 200
    assert SECRET not in reply.text
    beta = {a["id"]: a for a in reply.json()["data"]}["beta"]
    assert beta["chat_template"] is None and beta["refused"] == [side_file]


def test_an_adapter_read_back_from_disk_with_weights_linked_out_fails_alone(serve_adapter_dirs, tmp_path):
    outside = make_serve_adapter(tmp_path / "outside", seed=7)
    copies = {name: copy_adapter(serve_adapter_dirs[name], tmp_path / name) for name in ("alpha", "beta", "gamma")}
    # One adapter on the device and one on CPU: loading all three leaves alpha on disk only.
    with make_engine(copies, max_adapters_on_device=1, max_adapters_on_cpu=1) as engine:
        assert "alpha" not in engine.adapters.on_device and "alpha" not in engine.adapters.on_cpu
        weights = copies["alpha"] / "adapter_model.safetensors"
        weights.unlink()
        weights.symlink_to(outside / "adapter_model.safetensors")
        [linked, fine] = engine.generate([PROMPTS[0], PROMPTS[1]], ["alpha", "beta"], greedy(4))
    assert linked.finish_reason == "error" and linked.token_ids == []
    assert fine.finish_reason == "length" and len(fine.token_ids) == 4


# 6: the runs view --------------------------------------------------------------------------


def test_a_run_directory_linked_out_of_runs_is_neither_listed_nor_served(engine, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "metrics.jsonl", [{"step": 1, "password": SECRET}])
    (elsewhere / "report.html").write_text(SECRET)
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    write_jsonl(runs / "mine" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (runs / "escape").symlink_to(elsewhere)
    (runs / "alias").symlink_to(runs / "mine")  # a link that stays inside: the same run, once
    client = client_for(engine, runs=[runs])

    listed = client.get("/v1/runs")
    assert [r["id"] for r in listed.json()["data"]] == ["mine"]
    assert SECRET not in listed.text
    for what in ("metrics", "samples", "report"):
        reply = client.get(f"/v1/runs/escape/{what}")
        assert reply.status_code == 404, reply.text
        assert SECRET not in reply.text and "runs: mine" in reply.json()["error"]["message"]


def test_samples_are_the_last_rows_of_a_large_file(engine, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "prompt": f"{i}+{i}", "output": "x" * 600} for i in range(10_000)]  # ~6.5 MiB
    write_jsonl(run / "samples.jsonl", rows)
    size = (run / "samples.jsonl").stat().st_size
    assert size > ui.MAX_READ

    data = client_for(engine, runs=[run]).get("/v1/runs/run/samples").json()
    assert [r["step"] for r in data["rows"]] == list(range(10_000 - ui.MAX_SAMPLES, 10_000))
    assert data["skipped"] == 0
    # What lies before the part read is reported: whole lines, the file's size less what was read.
    read = sum(len(json.dumps(r)) + 1 for r in rows[-data["total"]:])
    assert data["skipped_bytes"] == size - read and data["skipped_bytes"] > 0
    assert ui.MAX_READ - 700 < read <= ui.MAX_READ


def test_an_over_long_metrics_line_is_skipped_counted_and_reading_goes_on(engine, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "metrics.jsonl"
    huge = json.dumps({"step": 2, "blob": "y" * (ui.MAX_READ + 1000)})
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + huge + "\n"
                    + json.dumps({"step": 3, "loss": 0.5}) + "\n" + json.dumps({"step": 4, "loss": 0.25}) + "\n")
    client = client_for(engine, runs=[run])

    rows, skipped, skipped_bytes, offset = [], 0, 0, 0
    for _ in range(5):  # as the page polls: from the offset the last answer gave
        data = client.get(f"/v1/runs/run/metrics?offset={offset}").json()
        rows += data["rows"]
        skipped += data["skipped"]
        skipped_bytes += data.get("skipped_bytes", 0)
        offset = data["offset"]
    assert [r["step"] for r in rows] == [1, 3, 4]
    assert (skipped, skipped_bytes, offset) == (1, len(huge) + 1, path.stat().st_size)

    # An over-long line still being written: passed over as far as it goes, then to its end.
    with path.open("a") as f:
        f.write(huge[: ui.MAX_READ + 10])
    first = client.get(f"/v1/runs/run/metrics?offset={offset}").json()
    assert (first["rows"], first["skipped"], first["offset"]) == ([], 1, path.stat().st_size)
    with path.open("a") as f:
        f.write(huge[ui.MAX_READ + 10:] + "\n" + json.dumps({"step": 5, "loss": 0.1}) + "\n")
    rest = client.get(f"/v1/runs/run/metrics?offset={first['offset']}").json()
    assert [r["step"] for r in rest["rows"]] == [5] and rest["skipped"] == 0
    assert first["skipped_bytes"] + rest["skipped_bytes"] == len(huge) + 1


def test_runs_of_one_name_under_several_roots_are_all_listed(engine, tmp_path):
    # Three roots laid out alike: the name clashes, and so does the parent's name.
    roots = [tmp_path / x / "runs" for x in "abc"]
    for loss, root in enumerate(roots):
        (root / "same").mkdir(parents=True)
        write_jsonl(root / "same" / "metrics.jsonl", [{"step": 1, "loss": float(loss)}])
    client = client_for(engine, runs=roots)

    ids = ["same", "runs/same", "runs/same~3"]
    listed = client.get("/v1/runs").json()["data"]
    assert [(r["id"], r["path"]) for r in listed] == [(i, str(root / "same")) for i, root in zip(ids, roots, strict=True)]
    assert [r["id"] for r in client.get("/v1/runs").json()["data"]] == ids  # the same on every call
    for loss, run_id in enumerate(ids):
        assert client.get(f"/v1/runs/{run_id}/metrics").json()["rows"] == [{"step": 1, "loss": float(loss)}]


def test_a_slow_runs_listing_does_not_hold_up_health(engine, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    listing = threading.Event()
    real = ui.run_dirs

    def slow(roots):  # as listing thousands of run directories on a slow disk
        listing.set()
        time.sleep(2.0)
        return real(roots)

    monkeypatch.setattr(ui, "run_dirs", slow)
    app = create_app(engine, model_name=BASE)
    mount_ui(app, engine, model_name=BASE, runs=[run])
    with Server(app) as server:
        replies: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: replies.append(httpx.get(server.url + "/v1/runs", timeout=30)))
        worker.start()
        assert listing.wait(10)
        start = time.perf_counter()
        health = httpx.get(server.url + "/health", timeout=30)
        waited = time.perf_counter() - start
        worker.join(30)
    assert health.status_code == 200 and waited < 0.5, waited
    assert [r["id"] for r in replies[0].json()["data"]] == ["run"]


# 7: lora_alpha must be a finite, sane number -------------------------------------------------


ALPHAS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "1e+308": 1e308}


def with_alpha(directory: Path, alpha: float, key: str = "lora_alpha") -> Path:
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if key == "lora_alpha":
        config["lora_alpha"] = alpha
    else:
        config[key] = {"q_proj": alpha}
    config_file.write_text(json.dumps(config))  # NaN, Infinity: what Python's and PEFT's json write
    return config_file


@pytest.mark.parametrize("shown", list(ALPHAS))
def test_a_non_finite_or_absurd_alpha_is_refused_when_read(serve_adapter_dirs, tmp_path, shown):
    adapter = copy_adapter(serve_adapter_dirs["beta"], tmp_path / "beta")
    config_file = with_alpha(adapter, ALPHAS[shown])
    with pytest.raises(ValueError) as err:
        read_adapter(adapter)
    message = str(err.value)
    assert message.startswith(f"{config_file}: lora_alpha ") and shown in message
    assert "at most 10000" in message

    pattern = copy_adapter(serve_adapter_dirs["beta"], tmp_path / "pattern")
    with_alpha(pattern, ALPHAS[shown], key="alpha_pattern")
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] .*at most 10000"):
        read_adapter(pattern)


@pytest.mark.parametrize("shown", ["nan", "inf", "1e+308"])
def test_check_and_export_refuse_a_bad_alpha_and_write_nothing(tiny_base_dir, tmp_path, capsys, shown):
    import lorakit

    model, _ = adapter_on_tiny_base(tiny_base_dir, r=4, alpha=8)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    config_file = with_alpha(adapter, ALPHAS[shown])
    before = sorted(p.name for p in tmp_path.iterdir())

    assert main(["check", str(adapter)]) == 1
    captured = capsys.readouterr()
    assert "loads and acts" not in captured.out and "Traceback" not in captured.err
    assert captured.err.startswith(f"lorakit check: error: {config_file}: lora_alpha ") and shown in captured.err

    out = tmp_path / "adapter.gguf"
    assert main(["export", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith(f"lorakit export: error: {config_file}: lora_alpha ") and shown in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .gguf, no temporary file


def test_the_server_refuses_a_bad_alpha_and_keeps_serving(engine, serve_adapter_dirs, tmp_path):
    root = tmp_path / "root"
    for shown, alpha in ALPHAS.items():
        with_alpha(copy_adapter(serve_adapter_dirs["beta"], root / shown), alpha)
    client = client_for(engine, adapter_roots=[root])
    for shown in ALPHAS:
        reply = client.post("/v1/adapters", json={"name": "bad", "path": shown})
        assert reply.status_code == 422, reply.text
        message = reply.json()["error"]["message"]
        assert "lora_alpha" in message and shown in message and "at most 10000" in message
    assert "bad" not in engine.adapter_names()
    done = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3


def test_a_template_swapped_for_a_link_after_loading_is_not_used_by_chat(serve_adapter_dirs, tmp_path) -> None:
    directory = copy_adapter(serve_adapter_dirs["beta"], tmp_path / "root" / "swapped")
    engine = make_engine({"swapped": directory}).start()
    try:
        client = client_for(engine)
        body = {"model": "swapped", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        (directory / "chat_template.jinja").symlink_to(secrets(tmp_path)["chat_template.jinja"])
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "model"
        assert SECRET not in refused.text
        assert client.get("/health").status_code == 200
    finally:
        engine.stop()
