"""`sdtorch serve`: the command line, and uvicorn running the app until Ctrl-C / SIGTERM.

On a signal the running job stops after its current step and goes back to the queue; the queue
stays in --data-dir for the next start; the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from sdtorch.serve import a1111

log = logging.getLogger("sdtorch.serve")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sdtorch serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="the model served by default (default: the built-in emoji model)")
    p.add_argument("--models-dir", help="every checkpoint in this folder is offered by name (nothing else can be loaded)")
    p.add_argument("--lora-dir", help="the folder <lora:NAME:W> tags are resolved in (default: MODELS_DIR/Lora)")
    p.add_argument("--embeddings-dir", help="textual-inversion embeddings for every model")
    p.add_argument("--controlnet-dir", help="the ControlNet files requests' units can name (default: MODELS_DIR/ControlNet)")
    p.add_argument("--styles-file", help="A1111's styles.csv: requests' `styles` are applied by name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", help="USER:PASS[,USER:PASS...]: HTTP basic auth on every route")
    p.add_argument("--data-dir", default="sdtorch-data", help="where the job queue and the images live")
    p.add_argument("--max-queue", type=int, default=64, help="jobs waiting or running before 429 (default 64)")
    p.add_argument("--preview-every", type=int, default=2, help="a live preview every N steps (0: none)")
    p.add_argument("--preview", choices=("cheap", "tiny", "full"), default="cheap",
                   help="cheap: latent->RGB linear map (default); tiny: the tiny decoder (the built-in "
                   "model's own); full: decode with the VAE")
    p.add_argument("--max-pixels", type=int, default=a1111.Limits.max_pixels, help="width x height x batch_size limit")
    p.add_argument("--max-steps", type=int, default=a1111.Limits.max_steps)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--seed-mode", choices=("a1111", "diffusers"), default="a1111",
                   help="a1111 (default): image i of a batch from seed + i, as AUTOMATIC1111; diffusers: one "
                   "generator per batch, as `sdtorch generate`'s default")
    p.add_argument("--queue", metavar="redis://HOST:PORT/DB", default=None,
                   help="run as a cluster's API node: jobs go to `sdtorch worker`s through this Redis (no model "
                        "is loaded here)")
    p.add_argument("--results-dir", default=None, help="with --queue: a folder shared with the workers for the "
                   "images (default: in Redis)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _auth(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth expects USER:PASS[,USER:PASS...], got {item!r}")
        pairs.append((user, password))
    return tuple(pairs)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sdtorch.serve.app import create_app
    from sdtorch.serve.service import Service, Settings

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    settings = Settings(
        data_dir=Path(args.data_dir), checkpoint=args.checkpoint, models_dir=args.models_dir, lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir, controlnet_dir=args.controlnet_dir, styles_file=args.styles_file, seed_mode=args.seed_mode,
        max_queue=args.max_queue,
        preview_every=args.preview_every,
        preview=args.preview, dtype=args.dtype, auth=_auth(args.api_auth),
        limits=a1111.Limits(max_pixels=args.max_pixels, max_steps=args.max_steps), queue=args.queue,
        results_dir=args.results_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth:
        print(f"sdtorch: WARNING: serving on {args.host} without --api-auth: anyone who can reach this "
              "machine can use it", file=sys.stderr, flush=True)
    service = Service(settings)
    if service.recovered:
        print(f"sdtorch: {len(service.recovered)} job(s) interrupted by the last shutdown will run again",
              file=sys.stderr, flush=True)
    if not service.clustered:
        service.models.get(service.options["sd_model_checkpoint"])  # load before saying ready
    app = create_app(service)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host = f"[{args.host}]" if ":" in args.host else args.host
                print(f"sdtorch serving on http://{host}:{args.port}", flush=True)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=5))
    # HTTP in a thread, generation in the main thread (see Worker.start); signals reach the main
    # thread: the running step finishes, its job goes back to the queue, the process exits 0.
    http = threading.Thread(target=server.run, name="sdtorch-http", daemon=True)

    def on_signal(sig, frame) -> None:
        service.worker.request_stop()
        service.hub.publish(None)
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http.start()
    try:
        service.worker.run(alive=http.is_alive)
    finally:
        service.hub.publish(None)
        server.should_exit = True
        http.join(30)
        service.store.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"sdtorch: error: {e}", file=sys.stderr)
        return 2
