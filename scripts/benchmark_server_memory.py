"""Does the server's memory grow over repeated rounds of infer requests? Prints the RSS per round.

Starts the MONAI Label app under uvicorn (``monai_sal_app.serve.start_background_server``) on the
default models of ``monai-sal serve --data DATA`` (real: ``chest_xray_2d`` 128^2 and
``ct_lesion_3d`` 32^3; shepp-logan: ``classifier_2d``/``classifier_3d``; trained for 1 epoch on a
few images by ``serve.prepare`` unless ``--workdir`` already holds them: the weights do not matter
for memory), then sends rounds of requests mixing 2D and 3D, datastore ids and direct uploads,
masks, and the methods given. After each round it prints the server process's resident set size.

    .venv/bin/python scripts/benchmark_server_memory.py --rounds 10 --requests 20

The first round includes one-off allocations (imports, first forward/backward, caches); growth is
reported from the end of round 1 to the end of the last round, per round. ``--max-growth-mb``
turns the report into a check (exit code 1 when exceeded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from monai_sal_app.serve import DEFAULT_MODELS, prepare, start_background_server


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=20, help="infer requests per round")
    p.add_argument("--methods", default="gradcam,gradient,integrated_gradients", help="comma list, used in turn")
    p.add_argument(
        "--data", choices=sorted(DEFAULT_MODELS), default="real", help="which default models (monai-sal serve --data)"
    )
    p.add_argument(
        "--workdir", default=None, help="keep data, models and the server log here (default: a temporary folder)"
    )
    p.add_argument(
        "--max-growth-mb", type=float, default=None, help="fail if RSS grows more than this from round 1 to the end"
    )
    return p.parse_args(argv)


def request_plan(studies: Path, models: list[str], methods: list[str], n: int) -> list[dict]:
    """``n`` request descriptions cycling over the models, datastore vs upload, with/without mask,
    methods; on the studies that have a mask (``<model>-NNN`` with ``labels/final/<model>-NNN``)."""
    plans = []
    images = {m: sorted(p.name for p in (studies / "labels" / "final").glob(f"{m}-*.nii.gz")) for m in models}
    for k in range(n):
        model = models[k % len(models)]
        name = images[model][(k // len(models)) % len(images[model])]
        plan = {
            "model": model,
            "method": methods[k % len(methods)],
            "mask": studies / "labels" / "final" / name if k % 3 == 0 else None,
        }
        if k % 4 < 2:
            plan["image_id"] = name.removesuffix(".nii.gz")
        else:
            plan["file"] = studies / name
        plans.append(plan)
    return plans


def send(url: str, plan: dict) -> None:
    files = {}
    if "file" in plan:
        files["file"] = (plan["file"].name, plan["file"].read_bytes())
    if plan["mask"] is not None:
        files["label"] = (plan["mask"].name, plan["mask"].read_bytes())
    response = requests.post(
        f"{url}/infer/{plan['model']}",
        params={"image": plan.get("image_id", ""), "output": "all"},
        data={"params": json.dumps({"method": plan["method"]})},
        files=files or None,
        timeout=600,
    )
    if response.status_code != 200:
        raise RuntimeError(f"{plan}: HTTP {response.status_code} {response.text[:300]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="monai-sal-bench-") as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        studies = prepare(
            work,
            work / "model",
            data=args.data,
            epochs=1,
            per_class=2,
            progress=False,
            test_per_class=4,
        )
        plans = request_plan(studies, list(DEFAULT_MODELS[args.data]), methods, args.requests)
        server = start_background_server(studies, conf={"model_dir": str(work / "model")}, workdir=work / "run")
        try:
            process = psutil.Process(server.pid)
            print(f"server pid {server.pid}; RSS at start {process.memory_info().rss / 2**20:.1f} MiB")
            print(f"{'round':>5} {'requests':>8} {'seconds':>8} {'RSS MiB':>9} {'vs round 1':>10}")
            first = None
            for round_index in range(1, args.rounds + 1):
                start = time.perf_counter()
                for plan in plans:
                    send(server.url, plan)
                rss = process.memory_info().rss / 2**20
                first = rss if first is None else first
                print(
                    f"{round_index:>5} {len(plans):>8} {time.perf_counter() - start:>8.2f} {rss:>9.1f} {rss - first:>+10.1f}",
                    flush=True,
                )
            growth = rss - first
            per_round = growth / max(1, args.rounds - 1)
            print(f"growth after round 1: {growth:+.1f} MiB over {args.rounds - 1} rounds ({per_round:+.2f} MiB/round)")
        finally:
            server.stop()
    if args.max_growth_mb is not None and growth > args.max_growth_mb:
        print(f"FAIL: RSS grew {growth:.1f} MiB > {args.max_growth_mb} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
