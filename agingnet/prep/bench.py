"""``make bench`` entries of ``prep align``: per-image alignment time of scikit-image's astronaut (512² photo,
a real face) at 1024 px output, and the speed-up of ``--workers 2`` over ``--workers 1``.

``n`` copies of the astronaut (one pixel changed per copy, so the content hashes differ and none is skipped)
are aligned by :func:`agingnet.prep.run_align` into a fresh folder per worker count, with the default
detector settings (dlib, ``upsample=1``). The dlib models are loaded before the clock starts (their load time
is reported separately); ``--workers 2`` forks two workers that inherit them, and its time includes the pool
start. Wall-clock via ``time.perf_counter``, CPU time (all processes) via ``getrusage``; the best of
``repeats`` runs per worker count. On a loaded machine the CPU time is the steadier number.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers, once it has shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_prep_align(n: int = 8, size: int = 1024, workers: tuple[int, ...] = (1, 2), repeats: int = 2) -> dict:
    from skimage.data import astronaut

    from agingnet.prep import aligning

    base = astronaut()
    with tempfile.TemporaryDirectory(prefix="agingnet-bench-prep-") as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        for i in range(n):
            a = base.copy()
            a[0, i] = (a[0, i].astype(np.int16) + 1) % 256
            Image.fromarray(a).save(raw / f"40_{i}.png")
        t0 = time.perf_counter()
        aligning._init_worker("dlib", 1, None)
        load_s = time.perf_counter() - t0
        res: dict = {"images": n, "size": size, "photo": "skimage astronaut 512x512", "model_load_s": load_s,
                     "runs": {}}
        for w in workers:
            times, cpu = [], []
            for r in range(repeats):
                out = Path(tmp) / f"out_w{w}_{r}"
                c0 = _cpu_s()
                t0 = time.perf_counter()
                summary = aligning.run_align(raw, out, size=size, workers=w, landmarks="dlib", upsample=1)
                times.append(time.perf_counter() - t0)
                cpu.append(_cpu_s() - c0)
                if summary["counts"]["kept"] != n:
                    raise RuntimeError(f"bench: only {summary['counts']['kept']} of {n} astronauts aligned")
            res["runs"][w] = {"s_best": min(times), "s_all": times, "ms_per_image": 1000 * min(times) / n,
                              "cpu_ms_per_image": 1000 * min(cpu) / n}
        if 1 in res["runs"] and 2 in res["runs"]:
            res["speedup_workers2"] = res["runs"][1]["s_best"] / res["runs"][2]["s_best"]
    return res


def rows(res: dict) -> list[str]:
    out = []
    for w, r in res["runs"].items():
        out.append(f"| prep align, astronaut → {res['size']} px, --workers {w} | {res['images']} photos | "
                   f"{r['ms_per_image']:.1f} ms/photo wall, {r['cpu_ms_per_image']:.1f} ms CPU | "
                   f"best of {len(r['s_all'])} |")
    if "speedup_workers2" in res:
        out.append(f"| prep align speed-up --workers 2 vs 1 | | ×{res['speedup_workers2']:.2f} | |")
    out.append(f"| prep dlib models load (once per process) | | {1000 * res['model_load_s']:.0f} ms | |")
    return out
