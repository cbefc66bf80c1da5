"""Generation: a `GenerationRequest` run by a loaded `Pipeline`, and the PNGs it writes.

    import sdtorch
    from sdtorch.generate import GenerationRequest
    pipe = sdtorch.load()                     # or a checkpoint path
    result = pipe.run(GenerationRequest("a red apple", steps=20, seed=42))
    result.images[0].save("apple.png")
"""

from sdtorch.generate.pipeline import Pipeline, load, save_png, to_pil
from sdtorch.generate.request import Cancelled, CancelToken, GenerationRequest, RequestError
from sdtorch.generate.run import RunResult

__all__ = ["Cancelled", "CancelToken", "GenerationRequest", "Pipeline", "RequestError", "RunResult", "load",
           "png_bytes", "save_png", "to_pil"]


def png_bytes(image) -> bytes:
    """The PNG file of an image, with its `parameters` chunk."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
