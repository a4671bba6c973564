"""The bundled model's continuations that lorakit ships (evaluation/measure.BUNDLED_REFERENCE) are
what the bundled model generates at `lorakit compare`'s defaults on this machine."""

import pytest

from lorakit.demo.make_reference import main

pytestmark = pytest.mark.experiment


def test_the_shipped_reference_equals_a_fresh_generation(capsys) -> None:
    assert main(["--check"]) == 0, capsys.readouterr().out
