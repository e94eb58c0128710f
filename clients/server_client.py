"""The HTTP client every longserve command uses: a model name, /tokenize, completions, on any OpenAI-compatible server."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass
class Server:
    """What the evaluation needs from a server: a model name, token counts, completions."""

    base_url: str  # ends with /v1
    model: str
    api_key: str | None = None
    timeout: float = 3600.0

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/").removesuffix("/v1")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def connect(cls, base_url: str, model: str | None, api_key: str | None) -> "Server":
        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        server = cls(base_url, model or "", api_key)
        if not model:
            listing = httpx.get(f"{base_url}/models", headers=server.headers(), timeout=30)
            listing.raise_for_status()
            server.model = listing.json()["data"][0]["id"]
        return server

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` alone (no special tokens)."""
        return self.tokenize_body({"prompt": text, "add_special_tokens": False})["tokens"]

    def tokenize_body(self, body: dict) -> dict:
        """The server's /tokenize answer (vLLM's and longserve's shape: tokens, count) for `body` + the model."""
        response = httpx.post(f"{self.root}/tokenize", json={"model": self.model, **body}, headers=self.headers(), timeout=120)
        if response.status_code == 404:
            raise SystemExit("this server has no /tokenize endpoint; exact token counts need it")
        response.raise_for_status()
        return response.json()

    def complete(self, prompt, position: dict | None, **fields) -> dict:
        body = {"model": self.model, "prompt": prompt, "temperature": 0, **fields}
        if position is not None:
            body["position"] = position
        response = httpx.post(f"{self.base_url}/completions", json=body, headers=self.headers(), timeout=self.timeout)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()
