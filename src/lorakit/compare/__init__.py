"""Adapters against their base: what they learned (task loss and metric) and what they forgot (KL).

`measure` holds the numbers, `report` writes report.json and report.html, `command` is
`lorakit compare`.
"""

from lorakit.evaluation.measure import (
    Divergence,
    Reference,
    divergence,
    file_reference,
    general_prompts,
    generated_reference,
)

__all__ = ["Divergence", "Reference", "divergence", "file_reference", "general_prompts", "generated_reference"]
