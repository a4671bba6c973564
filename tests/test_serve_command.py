"""`lorakit serve` end to end: a real process on a saved tiny model with an adapter, queried over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_serve_adapter
from lorakit.serve.command import ServeArgs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_args_validation() -> None:
    assert ServeArgs(adapter=["a=/x", "b=/y"]).adapters() == {"a": Path("/x"), "b": Path("/y")}
    with pytest.raises(ValueError, match="NAME=DIR"):
        ServeArgs(adapter=["just-a-dir"])
    with pytest.raises(ValueError, match="twice"):
        ServeArgs(adapter=["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="--max-batch"):
        ServeArgs(max_batch=0)
    with pytest.raises(ValueError, match="nf4 or int8"):
        ServeArgs(quantize="fp4")


def test_lorakit_serve_process(tiny_model_dir, tmp_path) -> None:
    adapter = make_serve_adapter(tmp_path / "demo", seed=5)
    port = free_port()
    code = (
        "from lorakit.serve.command import ServeArgs, run_serve; "
        f"run_serve(ServeArgs(model={str(tiny_model_dir)!r}, adapter=['demo={adapter}'], port={port}, "
        "device='cpu', api_key='k', log_level='warning'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"lorakit serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "lorakit serve did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == [str(tiny_model_dir), "demo"]
        reply = httpx.post(
            url + "/v1/completions",
            headers=headers,
            json={"model": "demo", "prompt": "hello", "max_tokens": 4, "temperature": 0},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_parses_repeated_adapter_options() -> None:
    from lorakit.cli import parse

    name, args = parse(["serve", "--adapter", "a=/x", "--adapter", "b=/y", "--max-batch", "4"])
    assert name == "serve" and args.adapter == ["a=/x", "b=/y"] and args.max_batch == 4
    assert parse(["serve", "--adapter=a=/x"])[1].adapters() == {"a": Path("/x")}
    assert parse(["serve", "--adapter", "[a=/x, b=/y]"])[1].adapter == ["a=/x", "b=/y"]
    args = parse(["serve", "--adapter-root", "/", "--max-request-bytes", "1000", "--max-adapters-on-cpu", "2"])[1]
    assert args.adapter_root == ["/"] and args.max_request_bytes == 1000 and args.max_adapters_on_cpu == 2
    with pytest.raises(SystemExit):
        parse(["serve", "--adapter", "no-name-here"])
