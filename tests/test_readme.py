"""README's Python example is examples/readme_example.py, and it runs as pasted."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_example_is_the_example_file_and_runs(tmp_path) -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "readme_example.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert example in blocks
    assert len(readme.splitlines()) <= 200
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "readme_example.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trainable params" in done.stdout
    assert (tmp_path / "out" / "my-adapter" / "adapter_model.safetensors").is_file()


def test_every_docs_page_the_readme_links_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|bench)/[^)#\s]+)", readme)
    assert links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
