"""The LoRAs a prompt's `<lora:name:multiplier>` tags name, looked up in one folder."""

from __future__ import annotations

from pathlib import Path

from sdtorch.adapters.lora import Applied, LoRANetwork, load, resolve_lora


class PromptLoRAs:
    """A `Pipeline.lora_loader` for one folder: makes exactly the LoRAs a prompt's
    `<lora:name:multiplier>` tags name active (dynamically), reading each file once."""

    def __init__(self, pipe, directory: str | Path):
        self.pipe, self.directory = pipe, Path(directory)
        self.networks: dict[str, LoRANetwork] = {}
        self.active: list[Applied] = []

    def __call__(self, tags: list[tuple[str, float]]) -> None:
        for applied in self.active:
            self.pipe.loras.remove(applied)
        self.active = []
        for name, strength in tags:
            if name not in self.networks:
                self.networks[name] = load(resolve_lora(name, self.directory), self.pipe.unet, self.pipe.clip,
                                           dtype=self.pipe.dtype, device=self.pipe.device, clip2=self.pipe.clip2)
            self.active.append(self.pipe.loras.add(self.networks[name], strength))
