"""The UNet and the VAE decode run by OpenVINO's CPU runtime (`--compile openvino`), an optional
backend.

sdtorch's own modules are converted by `openvino.convert_model` (traced at the shapes of the
first call) and compiled for the CPU with an inference precision that follows the pipeline's
dtype (bf16 -> "bf16", fp32 -> "f32"); the weights go in as float32, so OpenVINO rounds them
itself. One graph per input signature (shapes and the weights' version counters); converted
graphs are kept on disk in `cache_dir` (keyed by the model's hash) so a later process skips the
conversion.

The graph is a snapshot: whatever changes the UNet per request (LoRA hooks, attention hooks,
seamless tiling's circular padding, weights merged in place) makes that call run eagerly, with
an info line the first time, so a request never sees another request's model.
The eager PyTorch path stays the reference; `openvino` is an optional dependency.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from sdtorch.adapters.fast import snapshot_holds

log = logging.getLogger(__name__)

PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def file_key(path: Path) -> str:
    """A short key for a checkpoint file's converted graphs: its path, size and modification time
    (hashing a multi-GB file at every start would cost seconds)."""
    import hashlib

    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


class OpenVINOModule:
    """module(*tensors) -> tensor, computed by OpenVINO where the snapshot holds, eagerly otherwise."""

    backend = "OpenVINO"  # written into the infotext: it changes the image slightly

    def __init__(self, module: torch.nn.Module, *, cache_dir: str | Path | None = None, key: str = "",
                 name: str = "unet"):
        if not available():
            raise ImportError("--compile openvino needs the openvino package: pip install openvino")
        self.module = module
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.key, self.name = key, name
        self.graphs: dict[tuple, object] = {}
        self._told: set[str] = set()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        why = snapshot_holds(self.module)
        if why is not None:
            if why not in self._told:
                self._told.add(why)
                log.info("OpenVINO graph skipped for this call: %s; running eagerly", why)
            return self.module(*args)
        dtype = next(self.module.parameters()).dtype
        signature = (tuple(tuple(a.shape) for a in args), dtype, self._version())
        if signature not in self.graphs:
            self.graphs = {signature: self._compile(args, dtype)}  # a new version replaces the old
        request = self.graphs[signature]
        request.infer([a.detach().to("cpu", torch.float32).contiguous().numpy() for a in args])
        out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return out.to(device=args[0].device, dtype=args[0].dtype)

    def _version(self) -> int:
        """Changes when any weight is modified in place (a merged LoRA, a restored weight)."""
        return sum(p._version for p in self.module.parameters())

    def _path(self, args, precision: str) -> Path | None:
        if self.cache_dir is None or not self.key:
            return None
        shapes = "_".join("x".join(map(str, a.shape)) for a in args)
        return self.cache_dir / f"{self.name}-{self.key}-{shapes}-{precision}.xml"

    def _compile(self, args, dtype: torch.dtype):
        import openvino as ov

        precision = PRECISION[dtype]
        path = self._path(args, precision)
        core = ov.Core()
        if path is not None and path.exists():
            model = core.read_model(path)
            log.info("OpenVINO graph read from %s", path)
        else:
            model = self._convert(args)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                # fp16 on disk halves the file and the memory it maps; exact for bf16 weights, whose
                # 8 mantissa bits fp16 holds (fp32 pipelines keep fp32)
                ov.save_model(model, path, compress_to_fp16=dtype != torch.float32)
        model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, args)})  # static shapes
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}  # latency: as optimum-intel
        compiled = core.compile_model(model, "CPU", config)
        return compiled.create_infer_request()

    def _convert(self, args):
        """Trace a float32 copy (OpenVINO needs one element type per op; bf16 activations beside
        the fp32 norm parameters of sdtorch's fast path would not convert)."""
        import openvino as ov

        log.info("converting the %s to OpenVINO at %s (once per shape)", self.name, [tuple(a.shape) for a in args])
        module = self.module
        if next(module.parameters()).dtype != torch.float32:  # a copy: the loaded UNet stays as it is
            module = copy.deepcopy(module).float().to(memory_format=torch.contiguous_format)
        example = tuple(a.detach().to("cpu", torch.float32) for a in args)
        with torch.no_grad():
            return ov.convert_model(module, example_input=example)


class VAEDecode(torch.nn.Module):
    """The VAE's decode as a module's forward (what OpenVINO converts)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def compile_pipeline(pipe, cache_dir: str | Path | None) -> tuple[OpenVINOModule, OpenVINOModule]:
    """(UNet, VAE decode) through OpenVINO for `pipe`, graphs kept per checkpoint file in cache_dir."""
    key = file_key(pipe.path) if cache_dir and pipe.path is not None and pipe.path.is_file() else ""
    return (OpenVINOModule(pipe.unet, cache_dir=cache_dir, key=key),
            OpenVINOModule(VAEDecode(pipe.vae), cache_dir=cache_dir, key=key, name="vae-decode"))
