"""The playground's routes without a browser: the runs API (reading only inside the --runs
directories), the adapters listing against the files on disk, the static files and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorakit.serve.api import create_app
from lorakit.serve.command import ServeArgs
from lorakit.serve.ui import WEB, mount_ui, read_jsonl, run_dirs
from test_serve_engine import make_engine

BASE = "tiny-base"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def engine(serve_adapter_dirs):
    engine = make_engine({"alpha": serve_adapter_dirs["alpha"]}).start()
    yield engine
    engine.stop()


def app_for(engine, runs: list[Path], api_key: str | None = None):
    app = create_app(engine, model_name=BASE, api_key=api_key)
    mount_ui(app, engine, model_name=BASE, runs=runs)
    return TestClient(app)


def test_runs_are_found_in_and_below_the_given_directories(tmp_path, engine) -> None:
    one = tmp_path / "one"  # itself a run
    one.mkdir()
    write_jsonl(one / "metrics.jsonl", [{"step": 1, "loss": 2.0}])
    many = tmp_path / "many"  # a directory of runs, one of them also named "one"
    for name in ("one", "two"):
        (many / name).mkdir(parents=True)
        (many / name / "adapter_config.json").write_text("{}")
    (many / "not-a-run").mkdir()
    assert run_dirs([one, many]) == {"one": one, "many/one": many / "one", "two": many / "two"}

    client = app_for(engine, [one, many])
    listed = client.get("/v1/runs").json()
    assert [r["id"] for r in listed["data"]] == ["one", "many/one", "two"]
    assert listed["data"][0]["files"]["metrics.jsonl"] is True
    assert client.get("/v1/runs/many/one/metrics").json()["exists"] is False
    (many / "three").mkdir()  # a run that starts while the server runs
    write_jsonl(many / "three" / "metrics.jsonl", [])
    assert "three" in [r["id"] for r in client.get("/v1/runs").json()["data"]]


def test_metrics_are_read_from_an_offset_whole_lines_only(tmp_path, engine) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    path.write_text(json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n" + '{"step": 3, "lo')
    client = app_for(engine, [run])
    first = client.get("/v1/runs/run/metrics").json()
    assert first["rows"] == rows[:2] and first["skipped"] == 1 and first["reset"] is False
    assert first["offset"] == len(path.read_bytes()) - len('{"step": 3, "lo')  # the half line waits
    with path.open("a") as f:
        f.write('ss": 0.3333333333333333}\n')
    second = client.get(f"/v1/runs/run/metrics?offset={first['offset']}").json()
    assert second["rows"] == rows[2:] and second["offset"] == path.stat().st_size
    assert client.get(f"/v1/runs/run/metrics?offset={second['offset']}").json()["rows"] == []

    write_jsonl(path, rows[:1])  # rewritten shorter (a resumed run): the reader starts over
    again = client.get(f"/v1/runs/run/metrics?offset={second['offset']}").json()
    assert again["reset"] is True and again["rows"] == rows[:1]

    bad = client.get("/v1/runs/run/metrics?offset=-1")
    assert bad.status_code == 422 and "offset" in bad.json()["error"]["message"]
    # A line longer than a whole read is passed over and counted, never waited on.
    lines = read_jsonl(path, 0, limit=5)
    size = path.stat().st_size
    assert (lines.rows, lines.offset, lines.skipped, lines.skipped_bytes) == ([], size, 1, size)


def test_nothing_outside_the_run_directories_is_read(tmp_path, engine) -> None:
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [{"step": 1, "password": "hunter2"}])
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").symlink_to(secret)
    (run / "samples.jsonl").symlink_to(secret)
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "report.html").write_text("<p>ok</p>")
    client = app_for(engine, [tmp_path / "runs"])
    for what in ("metrics", "samples"):
        reply = client.get(f"/v1/runs/run/{what}")
        assert reply.status_code == 403, reply.text
        assert "points outside its directory" in reply.json()["error"]["message"]
        assert "hunter2" not in reply.text
    for name in ("..", "../secret.jsonl", "..%2F..%2Fsecret", "run/../../secret", "/etc"):
        reply = client.get(f"/v1/runs/{name}/metrics")
        assert reply.status_code == 404, (name, reply.text)
        assert "hunter2" not in reply.text
    unknown = client.get("/v1/runs/nope/samples").json()["error"]["message"]
    assert unknown == "no run named 'nope'; runs: other, run"


def test_reports_and_samples(tmp_path, engine) -> None:
    run = tmp_path / "run"
    run.mkdir()
    client = app_for(engine, [run])
    write_jsonl(run / "samples.jsonl", [{"prompt": "1+1", "output": "2"}])
    assert client.get("/v1/runs/run/samples").json()["rows"] == [{"prompt": "1+1", "output": "2"}]
    missing = client.get("/v1/runs/run/report")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "run 'run' has no report.html or report.json"

    (run / "report.json").write_text("{not json")
    broken = client.get("/v1/runs/run/report")
    assert broken.status_code == 422 and "report.json of run 'run' is not valid JSON" in broken.json()["error"]["message"]
    (run / "report.json").write_text(json.dumps({"kl": 0.25}))
    assert client.get("/v1/runs/run/report").json() == {"kl": 0.25}
    (run / "report.html").write_text("<h1>report</h1>")  # preferred when both exist
    html = client.get("/v1/runs/run/report")
    assert html.text == "<h1>report</h1>" and html.headers["content-type"].startswith("text/html")
    assert "sandbox" in html.headers["content-security-policy"]


def test_adapters_listing_matches_the_files(serve_adapter_dirs, engine, tmp_path) -> None:
    client = app_for(engine, [])
    source = serve_adapter_dirs["beta"]
    copy = tmp_path / "beta"
    copy.mkdir()
    for f in source.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    engine.load_adapter("beta", copy)
    try:
        data = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
    finally:
        engine.unload_adapter("beta")
    assert list(data) == ["alpha", "beta"]
    config = json.loads((source / "adapter_config.json").read_text())
    beta = data["beta"]
    assert (beta["r"], beta["lora_alpha"]) == (config["r"], config["lora_alpha"])
    assert beta["target_modules"] == sorted(config["target_modules"])
    assert beta["size_bytes"] == (source / "adapter_model.safetensors").stat().st_size
    assert beta["chat_template"] == "{{ messages }}" and data["alpha"]["chat_template"] is None
    assert beta["path"] == str(copy) and beta["served_base"] == BASE


def test_the_page_and_its_files_are_served_and_complete(engine) -> None:
    client = app_for(engine, [], api_key="k")
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    referenced = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)
    modules = ["/ui/" + m for f in WEB.glob("*.js") for m in re.findall(r'from "\./([\w.]+)"', f.read_text())]
    assert len(referenced) == 5 and len(set(modules)) == 6
    for path in referenced + modules:
        reply = client.get(path)
        assert reply.status_code == 200, path
        if path.endswith(".js"):
            assert reply.headers["content-type"].startswith("text/javascript"), path
    assert client.get("/ui/%2e%2e/ui.py").status_code == 404 and client.get("/ui/..%2fui.py").status_code == 404
    # The page's data needs the key like every /v1/ route.
    for path in ("/v1/runs", "/v1/adapters"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer k"}).status_code == 200


def test_runs_option(tmp_path) -> None:
    from lorakit.cli import parse

    args = parse(["serve", "--runs", str(tmp_path), "--runs", str(tmp_path)])[1]
    assert args.runs == [str(tmp_path), str(tmp_path)]
    with pytest.raises(ValueError) as err:
        ServeArgs(runs=[str(tmp_path / "missing")])
    assert str(err.value) == (
        f"--runs takes a training output directory (or a directory of them); {str(tmp_path / 'missing')!r} is not a directory"
    )


def test_adapters_listing_carries_the_check_verdicts(serve_adapter_dirs, engine, tmp_path) -> None:
    """Each loaded adapter comes with `lorakit check`'s verdict per serving target, judged
    against the served base model (its linear layers and vocabulary)."""
    from lorakit.export.check import LOADS, TARGETS, VLLM_MAX_LORA_RANKS, check, read_facts_on

    client = app_for(engine, [])
    [alpha] = client.get("/v1/adapters").json()["data"]
    verdicts = alpha["check"]
    assert [v["target"] for v in verdicts] == list(TARGETS)
    expected = check(read_facts_on(serve_adapter_dirs["alpha"], engine.model), name="alpha")
    assert [(v["target"], v["verdict"], v["command"]) for v in verdicts] == [
        (v.target, v.verdict, v.command) for v in expected
    ]
    # A plain LoRA adapter on the model's linear layers: every target takes it, and vLLM's
    # command asks for the smallest --max-lora-rank that holds its rank.
    assert {v["verdict"] for v in verdicts} == {LOADS}
    rank = json.loads((serve_adapter_dirs["alpha"] / "adapter_config.json").read_text())["r"]
    smallest = min(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    assert f"--max-lora-rank {smallest} " in verdicts[0]["command"]

    from lorakit.serve.ui import adapter_info

    gone = adapter_info("gone", tmp_path / "missing", BASE, engine.model)
    assert gone["check"].startswith("not checked: ") and "adapter_config.json is missing" in gone["check"]
