"""AUTOMATIC1111's HTTP API (1.10 paths, field names and response shapes) on the job queue:
txt2img / img2img (and the Extras tab's upscaling, `sdtorch.serve.extras`) are queued like any job
and answered when it finishes."""

from __future__ import annotations

import json
import sys
import time

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from sdtorch.generate import RequestError
from sdtorch.generate.infotext import parse_infotext
from sdtorch.sampling import samplers
from sdtorch.sampling.schedulers import SCHEDULERS
from sdtorch.serve import a1111, controlnet, extras
from sdtorch.serve.images import decode_image, encode_png
from sdtorch.serve.service import Service

SCHEDULER_RHO = {"karras": 7.0, "polyexponential": 1.0}


def add_routes(app: FastAPI, service: Service) -> None:
    _generation(app, service)
    _state(app, service)
    _lists(app, service)
    _controlnet(app, service)


def _generation(app: FastAPI, service: Service) -> None:
    async def finished(job_id: str, error: str, send: bool):
        """(the job's base64 images, the job) once it ends, or a 500 response saying why it failed."""
        job = await service.wait(job_id)
        if job.state != "completed":
            reason = job.error or f"the job was {job.state}"
            return JSONResponse({"error": error, "detail": reason, "errors": reason}, status_code=500), job
        return [encode_png(service.store.image_bytes(job.id, n)) for n in range(job.images)] if send else [], job

    async def run(kind: str, req: a1111._Common):
        images, job = await finished(service.submit(kind, req).id, "GenerationError", req.send_images)
        if isinstance(images, JSONResponse):
            return images
        return {"images": images, "parameters": service.parameters(job), "info": job.info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: a1111.Txt2Img):
        return await run("txt2img", req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: a1111.Img2Img):
        return await run("img2img", req)

    async def run_extras(kind: str, req: extras._Extras):
        images, job = await finished(service.submit_extras(kind, req).id, "PostprocessingError", req.show_extras_results)
        if isinstance(images, JSONResponse):
            return images
        html_info = json.loads(job.info)["html_info"]
        if isinstance(req, extras.ExtrasSingle):
            return {"html_info": html_info, "image": images[0] if images else None}
        return {"html_info": html_info, "images": images}

    def extras_route(kind: str, body: type):
        async def route(req):
            return await run_extras(kind, req)

        route.__annotations__ = {"req": body}  # FastAPI reads the body's model from the annotation
        return route

    for kind, body in extras.KINDS.items():  # /sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images
        app.post(f"/sdapi/v1/{kind}", name=kind.replace("-", "_"))(extras_route(kind, body))


def _state(app: FastAPI, service: Service) -> None:
    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        p = service.worker.progress
        waiting = service.store.waiting()
        running = p.job is not None
        eta = p.eta_s if running else None
        current = None
        if running and p.preview is not None and not skip_current_image:
            current = encode_png(p.preview)
        state = {
            "skipped": p.skipped, "interrupted": p.interrupted, "stopping_generation": False,
            "job": f"Batch {p.batch + 1} out of {p.batches}" if running else "",
            "job_count": (p.batches if running else 0) + max(waiting - running, 0),
            "job_timestamp": p.timestamp or time.strftime("%Y%m%d%H%M%S"), "job_no": p.batch if running else 0,
            "sampling_step": p.batch_step if running else 0, "sampling_steps": p.batch_steps if running else 0,
        }
        return {"progress": p.fraction if running else 0.0, "eta_relative": eta or 0.0, "state": state,
                "current_image": current, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        service.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        service.worker.skip()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options():
        return {**service.options, "sd_checkpoint_hash": service.models.find(service.options["sd_model_checkpoint"]).sha256,
                "show_progress_every_n_steps": service.settings.preview_every, "live_previews_enable": True,
                "samples_format": "png", "eta_ddim": 0.0, "eta_ancestral": 1.0}

    @app.post("/sdapi/v1/options")
    def set_options(options: dict = Body(...)):
        update = {}
        for key, value in options.items():
            if key not in a1111.OVERRIDABLE:
                raise RequestError(key, f"{key}: this option cannot be set (settable: {', '.join(a1111.OVERRIDABLE)})")
            if key == "sd_model_checkpoint":
                try:
                    value = service.models.find(str(value)).title
                except KeyError as e:
                    raise RequestError(key, f"{key}: {e.args[0]}") from None
            else:
                a1111._clip_skip(value)
            update[key] = value
        service.options.update(update)
        return None

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        s = service.settings
        return {"ckpt": s.checkpoint, "ckpt_dir": s.models_dir, "lora_dir": str(service.models.lora_dir or "") or None,
                "embeddings_dir": s.embeddings_dir, "api": True, "nowebui": False, "api_auth": None,
                "data_dir": str(s.data_dir), "listen": False, "port": None, "precision": s.dtype}

    @app.get("/internal/ping")
    def ping():
        return {}

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict = Body(...)):
        if "image" not in body:
            raise RequestError("image", "image: a base64-encoded PNG is required")
        image = decode_image(body["image"], "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}


def _lists(app: FastAPI, service: Service) -> None:
    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [c.a1111() for c in service.models.entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        service.models.refresh()
        return None

    @app.get("/sdapi/v1/samplers")
    def sampler_list():
        return [{"name": s.label, "aliases": [name, *[a for a, (b, _) in samplers.ALIASES.items() if b == name]],
                 "options": {}} for name, s in samplers.SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def scheduler_list():
        from sdtorch.sampling.samplers import LABELS

        return [{"name": name, "label": LABELS[name], "aliases": None, "default_rho": SCHEDULER_RHO.get(name, -1),
                 "need_inner_model": False} for name in SCHEDULERS]

    @app.get("/sdapi/v1/loras")
    def loras():
        from sdtorch.adapters.lora import SUFFIXES

        directory = service.models.lora_dir
        if directory is None:
            return []
        files = sorted(p for s in SUFFIXES for p in directory.rglob(f"*{s}"))
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None  # the LoRA folder is read on every request; nothing is cached by name

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        loaded = service.models.loaded
        found = loaded[1].embeddings if loaded is not None else {}
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": int(v.shape[-1]), "vectors": int(v.shape[0])} for name, v in found.items()},
                "skipped": {}}

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        built_in = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                    for name in ("None", "Lanczos", "Nearest")]
        return built_in + [{"name": c.model_name, "model_name": c.model_name, "model_path": str(c.path),
                            "model_url": None, "scale": 4} for c in service.models.upscalers()]

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [controlnet.SCRIPT], "img2img": [controlnet.SCRIPT]}

    @app.get("/sdapi/v1/script-info")
    def script_info():
        return [{"name": controlnet.SCRIPT, "is_alwayson": True, "is_img2img": img2img, "args": []}
                for img2img in (False, True)]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return []

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in service.styles.values()]

    @app.get("/sdapi/v1/memory")
    def memory():
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"ram": {"peak_rss": rss}, "cuda": {"error": "no CUDA device"}}



def _controlnet(app: FastAPI, service: Service) -> None:
    """sd-webui-controlnet's routes (`serve.controlnet`)."""

    @app.get("/controlnet/version")
    def version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True):
        return {"model_list": [e.title for e in service.models.controlnets.entries()]}

    @app.get("/controlnet/module_list")
    def module_list(alias_names: bool = False):
        from sdtorch.conditioning.preprocess import PREPROCESSORS

        return {"module_list": list(PREPROCESSORS),
                "module_detail": {name: controlnet.module_detail(name) for name in PREPROCESSORS}}

    @app.post("/controlnet/detect")
    def detect(body: dict = Body(...)):
        from sdtorch.generate.output import png_bytes

        images = body.get("controlnet_input_images", body.get("controlnet_images"))
        if not isinstance(images, list) or not images:
            raise RequestError("controlnet_input_images", "controlnet_input_images: a list of base64 images is required")
        unit = {"module": body.get("controlnet_module", "none"), "image": None,
                "processor_res": body.get("controlnet_processor_res", 512),
                "threshold_a": body.get("controlnet_threshold_a", -1), "threshold_b": body.get("controlnet_threshold_b", -1)}
        out = []
        for i, data in enumerate(images):
            image = decode_image(data, f"controlnet_input_images[{i}]")
            out.append(encode_png(png_bytes(controlnet.detect(unit, image))))
        return {"images": out, "info": "Success"}
