"""What `Fabric.generate` returns per prompt."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    tokens: list[int]                       # generated ids only
    text: str = ""
    finish_reason: str = "length"           # "length" | "stop" | "abort"
    # metrics: ttft_s (from the request's arrival at its instance to its first token), tpot_s,
    # latency_s, queued_s (arrival to its first step: a prefix fetched from a peer or a tier
    # lookup, the inbox, waiting for memory), prefix_fetch_s (of queued_s: pinning, copying or
    # leasing a peer's cached prefix, and looking the prompt up in the node's tiers),
    # num_prompt_tokens, num_output_tokens, num_preemptions, cached_tokens, tier_* (KV tiers)
    metrics: dict = field(default_factory=dict)
    request_id: str = ""
    home: int = -1                          # instance that served it
    error: str | None = None                # set when finish_reason == "error"
    error_type: str | None = None           # "RequestError", "CapacityError", ...

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"id": self.request_id, "error": self.error, "error_type": self.error_type}
        return {"id": self.request_id, "tokens": self.tokens, "text": self.text,
                "finish_reason": self.finish_reason, "metrics": self.metrics}
