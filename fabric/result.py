"""What `Fabric.generate` returns per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    tokens: list[int]                       # generated ids only
    text: str = ""
    finish_reason: str = "length"           # "length" | "stop" | "abort"
    metrics: dict = field(default_factory=dict)
    request_id: str = ""
    home: int = -1                          # instance that served it

    def to_dict(self) -> dict:
        return {"id": self.request_id, "tokens": self.tokens, "text": self.text,
                "finish_reason": self.finish_reason, "metrics": self.metrics}
