"""What a run card section reads: :class:`CardInputs`, built by :func:`lmforge.report.card.write_card`.

Its own module so that the section modules (:mod:`lmforge.report.card_eval`, ...) and the card that
lists them both import it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CardInputs:
    """Everything a section may show; ``extra`` carries the data of added sections."""

    name: str
    config_yaml: str
    summary: dict
    metrics: list[dict]
    data_stats: dict = field(default_factory=dict)
    tokenizer_stats: dict = field(default_factory=dict)
    eval_stats: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
