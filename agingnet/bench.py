"""``python -m agingnet.bench [--quick] [--full-step] [--out outputs/bench.json]`` (``make bench``).

Wall-clock medians (``time.perf_counter``; ``torch.cuda.synchronize`` around each call on a GPU) after
warm-up:

(a) one training step of the tiny configuration (``experiment=tiny_synthetic``, the former demo: tiny nets,
    Phase-3 loss stack, B=2):
    ``module.training_step`` (real + cycle pass, all loss terms) + backward + optimizer step, Trainer-less;
(b) the StyleGAN2 generator forward at 256 and 1024 px (random weights, B=1, const noise, no grad);
(c) the full SAM network (``build_aging_net()``: 2 × pSp encoders on IR-SE50, 1024 px decoder pooled to 256)
    forward at B = 1, 2, 4 (random weights, no grad);
(d) mining 8 queries against a 70,000 × 512 impostor bank (:func:`agingnet.miner.bench_mining`) and its ratio
    to one full-size training step of the nets: forward + backward of the real and the cycle pass at B=2
    (measured on a GPU or with ``--full-step``; otherwise estimated as 2 passes × 3 × forward(B=2) from (c),
    the usual forward+backward ≈ 3 × forward rule — the output says which).

(e) 1 vs 2 CPU processes (Lightning DDP, gloo): ``python -m agingnet.train experiment=phase3_oneshot_40
    debug=tiny`` for a few steps without validation, once with ``trainer=cpu`` and once with ``trainer=ddp_cpu
    trainer.devices=2`` (per-process batch 2, so the global batch doubles); each rank's median step time and
    samples/s come from its ``throughput:`` log line (:class:`agingnet.callbacks.distributed.StepThroughput`),
    the first step excluded. ``--ddp-only`` runs just this.
(f) ``prep align`` of the astronaut at 1024 px: ms per photo with ``--workers 1`` and 2, and the speed-up
    (:mod:`agingnet.prep.bench`; ``--prep-only`` runs just this).

Prints a markdown table and writes every number to ``outputs/bench.json`` (atomically).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agingnet.io import atomic_write_json
from agingnet.nn import add_age_channel


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int, dev: torch.device) -> dict[str, float]:
    """Median, min and max milliseconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(1000.0 * (time.perf_counter() - t0))
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
            "repeats": repeats}


# ---------------------------------------------------------------- (a) demo training step


def bench_demo_step(repeats: int, warmup: int, dev: torch.device) -> dict[str, Any]:
    """Forward (both passes, every loss term) + backward + optimizer step of the demo module, demo batch."""
    from hydra.utils import instantiate

    from agingnet.callbacks.personal_bank import embed_personal_set
    from agingnet.config import compose_config
    from agingnet.train import build_datamodule, prepare_bank

    with tempfile.TemporaryDirectory(prefix="agingnet-bench-") as tmp:
        cfg = compose_config(["experiment=tiny_synthetic"], output_dir=Path(tmp) / "run")
        prepare_bank(cfg)  # the demo's random impostor bank, written under the temporary run folder
        dm = build_datamodule(cfg)
        batch = next(iter(dm.train_dataloader()))
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        module = instantiate(cfg.model, loss=cfg.loss, _recursive_=False).to(dev)
        nn_id = module.loss.terms["nn_id"] if "nn_id" in module.loss.terms else None
        if nn_id is not None:  # what PersonalBankCallback does at fit start
            emb, keys = embed_personal_set(dm.personal_bank_dataset(), module.frozen.embed_face, device=dev)
            nn_id.set_bank(emb, keys, dm.fingerprint())
        module.train()
        params = [p for p in module.net.parameters() if p.requires_grad]
        optimizer = instantiate(module.hparams.optimizer, _convert_="all")(params)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()

        with warnings.catch_warnings():  # self.log() without a Trainer warns and does nothing
            warnings.simplefilter("ignore")
            res = time_ms(step, repeats, warmup, dev)
        res.update(batch_size=int(batch["image"].shape[0]), stage=str(cfg.stage),
                   loss_terms=sorted(module.loss.terms), trainable_params=sum(p.numel() for p in params))
        return res


# ---------------------------------------------------------------- (b) generator, (c)/(d) full SAM net


def bench_generator(size: int, repeats: int, warmup: int, dev: torch.device) -> dict[str, Any]:
    from agingnet.nn import Generator

    torch.manual_seed(0)
    g = Generator(size=size).to(dev).eval()
    w = torch.randn(1, g.n_latent, g.style_dim, device=dev)

    @torch.no_grad()
    def fwd() -> None:
        g(w, noise_mode="const")

    n = sum(p.numel() for p in g.parameters())
    return {"size": size, "params": n, **time_ms(fwd, repeats, warmup, dev)}


def full_sam_net(dev: torch.device):
    from agingnet.models import build_aging_net

    return build_aging_net().to(dev).eval()


def sam_input(b: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(b)
    rgb = torch.rand(b, 3, 256, 256, generator=g) * 2 - 1
    return add_age_channel(rgb, torch.full((b,), 0.4)).to(dev)


def bench_sam_forward(net, batch: int, repeats: int, warmup: int, dev: torch.device) -> dict[str, Any]:
    x = sam_input(batch, dev)

    @torch.no_grad()
    def fwd() -> None:
        net(x, noise_mode="const")

    return {"batch": batch, **time_ms(fwd, repeats, warmup, dev)}


def bench_sam_step(net, repeats: int, warmup: int, dev: torch.device, batch: int = 2) -> dict[str, Any]:
    """S2-style step of the nets alone: decoder trained, encoders frozen; real pass + cycle pass, backward of
    a simple pixel loss (the frozen loss networks are not included), no optimizer."""
    net.requires_grad_(False)
    net.decoder.requires_grad_(True)
    x = sam_input(batch, dev)
    back = torch.full((batch,), 0.3, device=dev)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        y, _ = net(x, noise_mode="random")
        y_rec, _ = net(add_age_channel(y.detach(), back), noise_mode="random")
        ((y - x[:, :3]).square().mean() + (y_rec - x[:, :3]).square().mean()).backward()

    return {"batch": batch, **time_ms(step, repeats, warmup, dev)}


# ---------------------------------------------------------------- driver


def run_prep(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from agingnet.prep.bench import bench_prep_align, rows

    log("(f) prep align …")
    res = bench_prep_align(n=4 if quick else 8, repeats=1 if quick else 2)
    log("\n| benchmark | photos | time | repeats |\n|---|---|---:|---:|")
    for row in rows(res):
        log(row)
    return res


# ---------------------------------------------------------------- (e) 1 vs 2 DDP processes


def bench_ddp_cpu(steps: int = 8, processes: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Per world size W: each rank's median step ms and samples/s, their sum (global samples/s) and the
    command's wall time, from real ``python -m agingnet.train`` runs (tiny config, no validation)."""
    import os
    import re
    import subprocess
    import sys

    pat = re.compile(r"throughput: rank (\d+)/(\d+) steps=(\d+) median_step_ms=([\d.]+) samples_per_s=([\d.]+)")
    out = []
    for w in processes:
        with tempfile.TemporaryDirectory(prefix="agingnet-bench-ddp-") as tmp:
            run_dir = Path(tmp) / "run"
            trainer = ["trainer=cpu"] if w == 1 else ["trainer=ddp_cpu", f"trainer.devices={w}"]
            cmd = [sys.executable, "-m", "agingnet.train", "experiment=phase3_oneshot_40", "debug=tiny", *trainer,
                   f"trainer.max_steps={steps}", f"val_interval={10 * steps}", f"image_interval={10 * steps}",
                   "logger=none", "callbacks.lr_monitor=null", "callbacks.fork_export.latest_link=null",
                   f"hydra.run.dir={run_dir}"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "AGINGNET_ROOT": tmp})
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise RuntimeError(f"bench (e): {' '.join(cmd[2:])} failed: {r.stderr.strip()[-500:]}")
            text = "".join(p.read_text() for p in run_dir.glob("*.log"))
            ranks = sorted({int(m[0]): {"rank": int(m[0]), "median_step_ms": float(m[3]),
                                        "samples_per_s": float(m[4])} for m in pat.findall(text)}.items())
            if len(ranks) != w:
                raise RuntimeError(f"bench (e): expected {w} throughput lines in {run_dir}, found {len(ranks)}")
            per = [v for _, v in ranks]
            out.append({"processes": w, "steps": steps, "batch_per_process": 2, "wall_s": wall, "ranks": per,
                        "median_step_ms": max(v["median_step_ms"] for v in per),
                        "samples_per_s": sum(v["samples_per_s"] for v in per)})
    return out


def run_ddp(out: Path, log: Callable[[str], None] = print, steps: int = 8) -> dict[str, Any]:
    """Section (e) alone (``--ddp-only``): prints its table and writes ``out``."""
    res = {"torch": torch.__version__, "cpu_count": __import__("os").cpu_count(), "ddp_cpu": bench_ddp_cpu(steps)}
    log_ddp(res["ddp_cpu"], log)
    atomic_write_json(res, out)
    log(f"wrote {out}")
    return res


def log_ddp(rows: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    log("")
    log("| (e) phase3_oneshot_40 debug=tiny on CPU | processes | median step ms (slowest rank) | "
        "samples/s (all ranks) | wall s |")
    log("|---|---:|---:|---:|---:|")
    for r in rows:
        log(f"| B=2 per process, {r['steps']} steps | {r['processes']} | {r['median_step_ms']:.0f} | "
            f"{r['samples_per_s']:.2f} | {r['wall_s']:.0f} |")


def run(quick: bool = False, full_step: bool = False, out: Path = Path("outputs/bench.json"),
        log: Callable[[str], None] = print, prep_only: bool = False) -> dict[str, Any]:
    if prep_only:
        res = {"prep_align": run_prep(quick, log)}
        atomic_write_json(res, out)
        log(f"wrote {out}")
        return res
    dev = device()
    gpu = dev.type == "cuda"
    heavy_r, heavy_w = (5, 2) if quick else (20, 3)
    if not gpu:  # full-size nets take seconds per call on a CPU
        heavy_r, heavy_w = (1, 1) if quick else (3, 1)
    light_r, light_w = (5, 2) if quick else (20, 3)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(dev) if gpu else cpu
    log(f"agingnet bench — torch {torch.__version__}, device {name}{' (quick)' if quick else ''}")
    res: dict[str, Any] = {"torch": torch.__version__, "device": name, "quick": quick}

    log("(a) demo training step …")
    res["demo_step"] = bench_demo_step(light_r, light_w, dev)
    log("(b) generator forward …")
    res["generator"] = [bench_generator(s, heavy_r if s > 256 else light_r, heavy_w, dev)
                        for s in (256, 1024)]
    log("(c) full SAM forward …")
    net = full_sam_net(dev)
    res["sam_forward"] = [bench_sam_forward(net, b, heavy_r, heavy_w, dev) for b in (1, 2, 4)]
    log("(d) mining …")
    from agingnet.miner import bench_mining

    res["mining"] = bench_mining(n=70000, d=512, queries=8, repeats=light_r * 2)
    fwd2 = next(r for r in res["sam_forward"] if r["batch"] == 2)["ms_median"]
    if gpu or full_step:
        log("(d) full SAM training step (real + cycle, B=2) …")
        res["sam_step"] = {**bench_sam_step(net, heavy_r, heavy_w, dev), "measured": True}
    else:
        res["sam_step"] = {"batch": 2, "ms_median": 6 * fwd2, "measured": False,
                           "note": "estimate: 2 passes × (forward + backward ≈ 3 × forward(B=2))"}
    mine_ms = res["mining"]["ms_p50"]
    res["mining_over_step"] = mine_ms / res["sam_step"]["ms_median"]

    rows = [("(a) demo training step (tiny nets, all Phase-3 terms, fwd+bwd+opt)",
             f"B={res['demo_step']['batch_size']}", res["demo_step"])]
    rows += [(f"(b) StyleGAN2 generator forward {g['size']} px", "B=1", g) for g in res["generator"]]
    rows += [("(c) full SAM net forward (1024 px decoder → 256)", f"B={r['batch']}", r)
             for r in res["sam_forward"]]
    mining = res["mining"]
    rows.append((f"(d) mining {mining['queries']} queries, 70,000 × 512 bank ({mining['backend']})", "8 q",
                 {"ms_median": mine_ms, "ms_min": mining["ms_min"], "repeats": mining["repeats"]}))
    step = res["sam_step"]
    rows.append(("(d) full SAM training step, real + cycle fwd+bwd"
                 + ("" if step["measured"] else " (ESTIMATE: 6 × fwd)"), "B=2", step))
    log("")
    log("| benchmark | batch | median ms | min ms | repeats |")
    log("|---|---|---:|---:|---:|")
    for label, b, r in rows:
        mn = f"{r['ms_min']:.1f}" if "ms_min" in r else "—"
        log(f"| {label} | {b} | {r['ms_median']:.1f} | {mn} | {r.get('repeats', '—')} |")
    log("(e) 1 vs 2 CPU processes (DDP) …")
    res["ddp_cpu"] = bench_ddp_cpu(4 if quick else 8)
    log_ddp(res["ddp_cpu"], log)
    kind = "measured" if step["measured"] else "estimated"
    log(f"\nmining / full training step ({kind}): {res['mining_over_step']:.4f} "
        f"({100 * res['mining_over_step']:.2f} % of a step)")
    res["prep_align"] = run_prep(quick, log)
    atomic_write_json(res, out)
    log(f"wrote {out}")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--full-step", action="store_true",
                   help="measure the full-size training step on CPU too (slow)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench.json"))
    p.add_argument("--prep-only", action="store_true", help="only (f), the prep align timings")
    p.add_argument("--ddp-only", action="store_true", help="only (e): 1 vs 2 CPU processes (DDP)")
    a = p.parse_args(argv)
    if a.ddp_only:
        run_ddp(a.out, steps=4 if a.quick else 8)
    else:
        run(quick=a.quick, full_step=a.full_step, out=a.out, prep_only=a.prep_only)


if __name__ == "__main__":
    main()
