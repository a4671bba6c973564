"""The playground in a real headless Chromium (Debian's `chromium`, driven by playwright),
against `lorakit serve` started here on a tiny model with two adapters.

Without /usr/bin/chromium these tests are skipped, unless LORAKIT_REQUIRE_BROWSER=1
(`make test-browser`, which installs it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_serve_adapter, tiny_llama_for_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if not CHROMIUM.exists():
    if os.environ.get("LORAKIT_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{CHROMIUM} is missing; `make test-browser` installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed (make test-browser installs it)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

KEY = "sesame"
PROMPT = "the quick brown fox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`python -m lorakit serve ...` in a child process, until the test module ends."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), "--device", "cpu",
                   "--log-level", "warning", *options]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"lorakit serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "lorakit serve did not come up"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("playground")
    model, tok = tiny_llama_for_tokenizer()
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    out = {"model": root / "tiny-llama", "runs": root / "runs"}
    for i, name in enumerate(("alpha", "beta", "gamma")):
        out[name] = make_serve_adapter(root / "adapters" / name, seed=200 + i)
    (root / "runs").mkdir()
    return out


@pytest.fixture(scope="module")
def server(files):
    running = Serve("--model", str(files["model"]), "--served-model-name", "tiny-base",
                    "--adapter", f"alpha={files['alpha']}", "--adapter", f"beta={files['beta']}",
                    "--runs", str(files["runs"]), "--adapter-root", str(files["gamma"].parent))
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"errors in the page: {errors}"


def metrics(url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = re.sub(r"\{.*\}", "", line).split()
            totals[name] = totals.get(name, 0) + float(value)
    return totals


def model_ids(url: str, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]]


def test_compare_streams_three_columns_in_one_batch(server, page: Page) -> None:
    page.goto(server.url + "/#compare")
    columns = page.locator("#columns .column")
    expect(columns).to_have_count(3)
    assert [c.get_attribute("data-model") for c in columns.all()] == ["tiny-base", "alpha", "beta"]
    page.select_option("#mode", "completion")
    page.fill("#max-tokens", "96")  # long enough that the three overlap for most steps
    page.fill("#temperature", "0")
    page.fill("#prompt", PROMPT)
    # Record every length each answer passes through: a streamed answer grows in steps.
    page.evaluate(
        "() => { window.seen = {}; new MutationObserver(() => { for (const a of document.querySelectorAll('#columns .answer')) {"
        " const m = a.closest('.column').dataset.model; (window.seen[m] ||= new Set()).add(a.textContent.length); } })"
        ".observe(document.getElementById('columns'), {subtree: true, childList: true, characterData: true}); }"
    )
    before = metrics(server.url)
    page.click("#send")
    answers = page.locator("#columns .answer")
    expect(answers).to_have_count(3)
    for i in range(3):
        expect(answers.nth(i)).to_have_attribute("data-done", "true", timeout=60_000)
    after = metrics(server.url)
    texts = [a.text_content() for a in answers.all()]
    assert all(texts) and len(set(texts)) == 3, texts
    lengths = page.evaluate("() => Object.fromEntries(Object.entries(window.seen).map(([m, s]) => [m, s.size]))")
    assert set(lengths) == {"tiny-base", "alpha", "beta"} and min(lengths.values()) >= 4, lengths

    # The base column is what /v1/completions answers for the base; each adapter's likewise.
    for model, text in zip(["tiny-base", "alpha", "beta"], texts, strict=True):
        reply = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": model, "prompt": PROMPT, "max_tokens": 96, "temperature": 0}).json()
        assert reply["choices"][0]["text"] == text, model

    # One mixed batch: with only these three requests running, more than 2 rows per decode
    # step on average means at least one step decoded all three together.
    steps = after["lorakit_decode_steps_total"] - before["lorakit_decode_steps_total"]
    rows = after["lorakit_decode_rows_total"] - before["lorakit_decode_rows_total"]
    assert steps > 0 and rows > 2 * steps, (rows, steps)
    expect(page.locator("#batch-note")).to_contain_text("3 columns decoded together")

    # Words an adapter's answer does not share with the base are marked; the base is not.
    assert page.locator(".column[data-model=tiny-base] mark").count() == 0
    assert page.locator(".column[data-model=alpha] mark").count() > 0


def test_chat_keeps_a_history_per_column(server, page: Page) -> None:
    page.goto(server.url + "/#compare")
    page.uncheck("#columns-choice input[value=beta]")
    expect(page.locator("#columns .column")).to_have_count(2)
    page.fill("#max-tokens", "6")
    for turn in ("hi", "again"):
        page.fill("#prompt", turn)
        page.click("#send")
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    alpha = page.locator(".column[data-model=alpha]")
    expect(alpha.locator(".user")).to_have_text(["hi", "again"])
    first, second = (a.text_content() for a in alpha.locator(".answer").all())
    # The second turn carries the first exchange, as the chat endpoint would be sent it.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "again"}]
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "alpha", "messages": messages, "max_tokens": 6, "temperature": 0}).json()
    assert reply["choices"][0]["message"]["content"] == second


def test_load_and_unload_an_adapter_from_the_page(server, files, page: Page) -> None:
    page.goto(server.url + "/#adapters")
    rows = page.locator("#adapter-table tbody tr")
    expect(rows).to_have_count(2)
    config = json.loads((files["alpha"] / "adapter_config.json").read_text())
    alpha = page.locator("tr[data-adapter=alpha] td")
    expect(alpha.nth(1)).to_have_text(str(config["r"]))
    expect(alpha.nth(3)).to_have_text(", ".join(sorted(config["target_modules"])))

    page.fill("#load-name", "gamma")
    page.fill("#load-path", str(files["gamma"]))
    page.click("#load")
    expect(page.locator("#adapter-status")).to_have_text("Loaded gamma.")
    expect(rows).to_have_count(3)
    assert model_ids(server.url) == ["tiny-base", "alpha", "beta", "gamma"]
    expect(page.locator("#columns-choice input[value=gamma]")).to_have_count(1)

    # A bad directory: the server's message is shown and nothing changes.
    page.fill("#load-name", "broken")
    page.fill("#load-path", str(files["gamma"].parent / "nothing-here"))
    page.click("#load")
    expect(page.locator("#adapter-status")).to_contain_text("Could not load broken")
    assert model_ids(server.url) == ["tiny-base", "alpha", "beta", "gamma"]

    page.click("button[data-unload=gamma]")
    expect(page.locator("#adapter-status")).to_have_text("Unloaded gamma.")
    expect(rows).to_have_count(2)
    assert model_ids(server.url) == ["tiny-base", "alpha", "beta"]


def test_runs_view_plots_a_run_as_it_writes(server, files, page: Page) -> None:
    run = files["runs"] / "run-1"
    run.mkdir()
    rows = [{"step": s, "epoch": s / 10, "lr": 1e-3 * (1 - s / 10), "loss": 3.0 / s, "tokens_per_s": 100.0 + s}
            for s in range(1, 6)]
    rows[-1]["eval_loss"] = 0.9
    metrics_file = run / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (run / "samples.jsonl").write_text(json.dumps({"prompt": "2+2", "base": "5", "adapter": "4"}) + "\n")
    (run / "report.html").write_text("<h1>compare report</h1><script>document.title='ran'</script>")

    page.goto(server.url + "/#runs")
    expect(page.locator("#run-list a")).to_have_text(["run-1"])
    loss = page.locator("figure.chart[data-title=loss]")
    expect(loss).to_have_attribute("data-points", "3")
    expect(page.locator("figure.chart[data-title='learning rate']")).to_have_attribute("data-points", "3")
    expect(page.locator("figure.chart[data-title=tokens_per_s]")).to_have_attribute("data-points", "3")
    assert page.locator("figure.chart[data-title=epoch]").count() == 0  # the x axis's kin, not plotted

    # The run goes on: two more records (and a half-written line) appear without a reload.
    with metrics_file.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[3:]) + '{"step": 6, "lo')
    expect(loss).to_have_attribute("data-points", "5", timeout=15_000)
    expect(page.locator("#run-status")).to_have_text("5 records, last at step 5")
    expect(loss.locator(".u-series .u-label")).to_have_text(["step", "loss", "eval_loss"])
    drawn = loss.evaluate(
        "f => { const c = f.querySelector('canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"
    )
    assert drawn > 500  # the lines and axes are on the canvas

    expect(page.locator("#samples table td pre")).to_have_text(["2+2", "5", "4"])
    frame = page.frame_locator("#report iframe")
    expect(frame.locator("h1")).to_have_text("compare report")
    assert page.locator("#report iframe").get_attribute("sandbox") == ""  # its script never runs


def test_server_view_shows_the_metrics(server, page: Page) -> None:
    page.goto(server.url + "/#server")
    card = page.locator(".card[data-metric='adapters loaded'] .value")
    expect(card).to_have_text(str(int(metrics(server.url)["lorakit_adapters_loaded"])))
    generated = page.locator(".card[data-metric='tokens generated'] .value")
    expect(generated).not_to_have_text("-")
    assert float(generated.text_content()) <= metrics(server.url)["lorakit_generation_tokens_total"]
    expect(page.locator("figure.chart")).to_have_count(1)


def test_api_key_is_asked_for_and_adapter_actions_need_it(files, browser) -> None:
    server = Serve("--model", str(files["model"]), "--served-model-name", "tiny-base",
                   "--adapter", f"alpha={files['alpha']}", "--adapter-root", str(files["gamma"].parent),
                   "--api-key", KEY)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url + "/#adapters")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.click("#key-cancel")
        expect(page.locator("body")).to_have_attribute("data-ready", "locked")

        page.fill("#load-name", "gamma")
        page.fill("#load-path", str(files["gamma"]))
        page.click("#load")
        expect(page.locator("#adapter-status")).to_contain_text("401: missing or wrong API key")
        assert model_ids(server.url, KEY) == ["tiny-base", "alpha"]

        page.click("#key-button")
        page.fill("#key-input", "wrong")
        page.click("#key-ok")
        expect(page.locator("#key-error")).to_have_text("That key was refused; try again.")
        page.fill("#key-input", KEY)
        page.click("#key-ok")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#adapter-table tbody tr")).to_have_count(1)
        page.click("#load")
        expect(page.locator("#adapter-status")).to_have_text("Loaded gamma.")
        assert model_ids(server.url, KEY) == ["tiny-base", "alpha", "gamma"]
    finally:
        context.close()
        server.close()
