"""Server latency against in-process ``explain_array`` time for the same input: the server's overhead.

For each default model of ``monai-sal serve --data DATA`` (real: ``chest_xray_2d`` 128^2 on
256^2 images and ``ct_lesion_3d`` 32^3 on 64^3 volumes; prepared by ``serve.prepare`` as in
``benchmark_server_memory.py``) and each method, the same image is explained ``--repeats``
times by a POST to the running server (datastore id, ``output=all``: JSON + NIfTI heatmap, timed
end to end by the client) and in this process by ``inference.explain_array`` on the same
checkpoint (``read_image`` + ``explain_array``, the work the server's task does, minus HTTP,
multipart encoding and the heatmap write). Medians are printed with their ratio and difference.

    .venv/bin/python scripts/benchmark_server_latency.py --repeats 10

Both sides use the same number of torch threads (``--threads``, default 1: the server is started
with ``OMP_NUM_THREADS`` set to it and this process calls ``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch
from requests_toolbelt.multipart.decoder import MultipartDecoder

from monai_sal_app.data.io import read_image
from monai_sal_app.inference import explain_array
from monai_sal_app.models.checkpoint import load_classifier
from monai_sal_app.serve import DEFAULT_MODELS, prepare, start_background_server


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default="gradcam,gradient,integrated_gradients", help="comma list")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument(
        "--data", choices=sorted(DEFAULT_MODELS), default="real", help="which default models (monai-sal serve --data)"
    )
    p.add_argument(
        "--workdir", default=None, help="keep data, models and the server log here (default: a temporary folder)"
    )
    return p.parse_args(argv)


def time_server(url: str, model: str, image_id: str, method: str, repeats: int) -> tuple[list[float], list[float]]:
    """End-to-end seconds per request, and the task's own ``seconds.task_total`` reported in the JSON."""
    wall, task = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        response = requests.post(
            f"{url}/infer/{model}",
            params={"image": image_id, "output": "all"},
            data={"params": json.dumps({"method": method})},
            timeout=600,
        )
        wall.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise RuntimeError(f"{model} {method}: HTTP {response.status_code} {response.text[:300]}")
        parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
        result = next(json.loads(p.content) for p in parts if b'name="params"' in p.headers[b"Content-Disposition"])
        task.append(result["seconds"]["task_total"])
    return wall, task


def time_in_process(checkpoint: Path, image: Path, method: str, repeats: int) -> list[float]:
    """Seconds of read_image + explain_array, per repeat (the model is loaded once, as the server does)."""
    model, card = load_classifier(checkpoint, device=None)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        array, _ = read_image(image)
        explain_array(model, card, array, method)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="monai-sal-bench-") as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        model_dir = work / "model"
        studies = prepare(work, model_dir, data=args.data, epochs=1, per_class=2, test_per_class=4, progress=False)
        server = start_background_server(
            studies,
            conf={"model_dir": str(model_dir)},
            workdir=work / "run",
            extra_env={"OMP_NUM_THREADS": str(args.threads)},
        )
        try:
            print(
                f"{'model':<14} {'method':<22} {'server ms':>10} {'task ms':>9} {'in-process ms':>14} {'ratio':>6} {'overhead ms':>12}"
            )
            for model in DEFAULT_MODELS[args.data]:
                image_id = f"{model}-000"
                image = studies / f"{image_id}.nii.gz"
                for method in methods:
                    time_server(server.url, model, image_id, method, 1)  # warm-up (first forward/backward)
                    time_in_process(model_dir / f"{model}.pt", image, method, 1)
                    wall, task = time_server(server.url, model, image_id, method, args.repeats)
                    local = time_in_process(model_dir / f"{model}.pt", image, method, args.repeats)
                    w, t, in_process = (1000 * statistics.median(v) for v in (wall, task, local))
                    print(
                        f"{model:<14} {method:<22} {w:>10.1f} {t:>9.1f} {in_process:>14.1f} {w / in_process:>6.2f} {w - in_process:>12.1f}",
                        flush=True,
                    )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
