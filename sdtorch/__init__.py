"""sdtorch: Stable Diffusion in plain PyTorch.

    import sdtorch
    pipe = sdtorch.load("v1-5-pruned-emaonly.safetensors")
    image = pipe.generate("a photo of an astronaut riding a horse", seed=42)[0]
"""

from sdtorch.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "CancelToken", "GenerationRequest", "ModelConfig", "Pipeline", "load", "save_png"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline (and torch model code) is imported on first use, so `import sdtorch.config`
    # and the CLI's argument parsing stay light.
    if name in ("Pipeline", "load", "save_png", "GenerationRequest", "CancelToken"):
        import sdtorch.generate as pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdtorch' has no attribute {name!r}")
