"""Generation: a `GenerationRequest` run by a loaded `Pipeline`, and the PNGs it writes.

    import sdtorch
    from sdtorch.generate import GenerationRequest
    pipe = sdtorch.load()                     # or a checkpoint path
    result = pipe.run(GenerationRequest("a red apple", steps=20, seed=42))
    result.images[0].save("apple.png")
"""

from sdtorch.generate.loading import load
from sdtorch.generate.output import png_bytes, save_png, to_pil
from sdtorch.generate.pipeline import Pipeline
from sdtorch.generate.request import Cancelled, CancelToken, GenerationRequest, RequestError
from sdtorch.generate.run import RunResult

__all__ = ["Cancelled", "CancelToken", "GenerationRequest", "Pipeline", "RequestError", "RunResult", "load",
           "png_bytes", "save_png", "to_pil"]
