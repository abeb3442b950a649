"""``prep align``: raw photos → FFHQ-aligned ``{age}_{idx}.png`` + ``prep_summary.json`` (every input listed).

Per input (sorted by path): hash its bytes (SHA-256) → exact duplicates of an earlier input and inputs already
aligned by a previous run with the same size and age are skipped → age (file name, CSV, or DEX with
``--estimate-ages``) → decode (:func:`agingnet.prep.faces.read_photo`) → detect every face → choose one →
:func:`agingnet.align.align_face` → write atomically.

Choosing the face: a photo with one face keeps it. With several, the face whose 128-d embedding is nearest the
actor's centre (coordinate-wise median of the single-face photos' embeddings, or of ``--actor`` reference photos)
is kept; those photos are therefore aligned in a second round, after the single-face ones. With no centre at all
(no single-face photo) the largest face is kept.

Geometry recorded per kept face (original-photo pixels): ``face_size`` = side of the FFHQ crop square
(:func:`agingnet.align.ffhq_quad`), ``angle_deg`` = rotation of its "right" axis (counter-clockwise positive
in image coordinates, y down), ``centre`` = its centre. ``prep filter`` reads ``face_size``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agingnet.align import align_face, ffhq_quad
from agingnet.io import atomic_write, atomic_write_json
from agingnet.prep.ages import AgeError, age_from_name, read_ages_csv
from agingnet.prep.faces import FaceModels, PhotoError, read_photo

SUMMARY = "prep_summary.json"
REJECTED = "_rejected"
CHECKPOINT_S = 2.0  # rewrite the summary at most this often while aligning

_MODELS: FaceModels | None = None
_DEX = None
_INIT_ARGS: tuple | None = None


def _init_worker(landmarks: str, upsample: int, dex_path: str | None) -> None:
    """Process-pool initializer: the dlib models (and DEX) are loaded once per process, not once per photo.

    A no-op when this process already holds models built with the same arguments (a forked worker inherits
    the parent's, copy-on-write)."""
    global _MODELS, _DEX, _INIT_ARGS
    if _INIT_ARGS == (landmarks, upsample, dex_path):
        return
    if _INIT_ARGS is None or _INIT_ARGS[:2] != (landmarks, upsample):
        _MODELS = FaceModels(landmarks, upsample)
    _DEX = None
    if dex_path:
        from agingnet.pretrained import load_dex

        _DEX = load_dex(dex_path)
    _INIT_ARGS = (landmarks, upsample, dex_path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def geometry(landmarks: np.ndarray) -> dict:
    """face_size, angle_deg and centre of the FFHQ crop square of ``landmarks`` (see the module doc)."""
    q = ffhq_quad(landmarks)
    right = q[3] - q[0]
    return {"face_size": round(float(np.hypot(*right)), 2),
            "angle_deg": round(math.degrees(math.atan2(-right[1], right[0])), 2),
            "centre": [round(float(v), 2) for v in q.mean(0)]}


def _estimate_age(img) -> int:
    import torch

    from agingnet.viz import from_uint8

    x = from_uint8(np.asarray(img.resize((224, 224)), dtype=np.uint8))[None]
    with torch.no_grad():
        return int(round(float(_DEX.predict_age(x)[0])))


def process_one(task: dict) -> dict:
    """Align one photo (runs in a worker). ``task``: path, rec (the summary record so far), out_dir, size,
    centre (list or None), defer (return "deferred" with the detected faces instead of guessing among
    several), faces (the faces a deferred first round found: no second detection)."""
    rec = dict(task["rec"])
    try:
        img, notes = read_photo(task["path"])
    except PhotoError as e:
        return {**rec, "kept": False, "status": "not_image", "reason": str(e)}
    rec.update(notes, width=img.width, height=img.height)
    faces = task.get("faces")
    if faces is None:
        faces = _MODELS.faces(img)
    rec["faces"] = len(faces)
    if not faces:
        return {**rec, "kept": False, "status": "no_face", "reason": "no face found"}
    if len(faces) == 1:
        face, rec["chosen_by"] = faces[0], "only face"
    elif task["centre"] is not None:
        c = np.asarray(task["centre"], dtype=np.float32)
        face = min(faces, key=lambda f: float(np.linalg.norm(f.embedding - c)))
        rec["chosen_by"] = "nearest the actor's identity"
    elif task["defer"]:
        return {**rec, "status": "deferred", "candidates": faces}
    else:
        face, rec["chosen_by"] = max(faces, key=lambda f: f.area), "largest face"
    try:
        rec.update(geometry(face.landmarks), box=list(face.box),
                   embedding=[round(float(v), 5) for v in face.embedding])
        aligned = align_face(img, face.landmarks, output_size=task["size"])
    except ValueError as e:  # degenerate landmarks (e.g. a face seen edge-on): this photo only
        return {**rec, "kept": False, "status": "align_failed", "reason": str(e)}
    if rec.get("age") is None:  # only reached with --estimate-ages; the parent names the file afterwards
        rec["age"], rec["age_source"] = _estimate_age(aligned), "dex (estimated)"
    name = rec.get("output") or f".estimated_{rec['sha256'][:16]}.png"
    # PNG level 3 instead of PIL's 6: a third of the encoding time at 1024 px for files ~11 % larger
    atomic_write(Path(task["out_dir"]) / name, lambda f: aligned.save(f, format="PNG", compress_level=3))
    return {**rec, "kept": True, "status": "aligned"}


def list_inputs(root: Path) -> list[Path]:
    """Every regular, non-hidden file under ``root`` (recursively), sorted by relative path."""
    files = [p for p in root.rglob("*")
             if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _existing_outputs(out: Path) -> set[str]:
    names = {p.name for p in out.glob("*.png")}
    names |= {p.name for p in out.glob(f"{REJECTED}/*/*.png")}
    return names


def _output_exists(out: Path, name: str) -> bool:
    return (out / name).is_file() or any(out.glob(f"{REJECTED}/*/{name}"))


def check_folders(inp: Path, out: Path) -> None:
    if not inp.is_dir():
        raise FileNotFoundError(f"input folder not found: {inp}")
    ri, ro = inp.resolve(), out.resolve()
    if ro == ri or ri in ro.parents:
        raise ValueError(f"output folder {out} is inside the input folder {inp}; choose a folder outside it")


def _actor_centre(records: list[dict]) -> list[float] | None:
    embs = [r["embedding"] for r in records if r.get("kept") and r.get("faces") == 1 and r.get("embedding")]
    return np.median(np.asarray(embs), axis=0).tolist() if embs else None


def _run(tasks: list[dict], workers: int, init_args: tuple, desc: str, on_result=None) -> list[dict]:
    """process_one over ``tasks`` (in order), in this process or a pool; ``on_result(record)`` after each."""
    if not tasks:
        return []
    fork = sys.platform.startswith("linux")
    if workers <= 1 or fork:  # forked workers inherit the parent's models instead of each reading 130 MB
        _init_worker(*init_args)
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results = map(process_one, tasks)
        else:  # processes, not threads: they scale whichever parts of dlib and PIL release the GIL
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                           initargs=init_args))
            results = pool.map(process_one, tasks)
        out = []
        for r in tqdm(results, total=len(tasks), desc=desc, unit="photo", disable=None):
            out.append(r)
            if on_result is not None:
                on_result(r)
        return out


def run_align(inp: Path, out: Path, ages_csv: Path | None = None, size: int = 1024, workers: int = 1,
              estimate_ages: bool = False, dex: Path | None = None, actor: list[Path] | None = None,
              landmarks: str = "auto", upsample: int = 1) -> dict:
    """Align every photo under ``inp`` into ``out``; returns (and writes) the summary."""
    check_folders(inp, out)
    if size < 64:
        raise ValueError(f"--size must be >= 64, got {size}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if estimate_ages and dex is None:
        raise ValueError("--estimate-ages needs --dex <dex_age_classifier.pth>")
    if dex is not None and not Path(dex).is_file():
        raise FileNotFoundError(f"DEX weights not found: {dex}")
    for a in actor or []:
        if not Path(a).is_file():
            raise FileNotFoundError(f"--actor photo not found: {a}")
    table = read_ages_csv(ages_csv) if ages_csv is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    previous = _load_previous(out / SUMMARY)
    init_args = (landmarks, upsample, str(dex) if estimate_ages else None)

    files = list_inputs(inp)
    used_names = _existing_outputs(out) | {r["output"] for r in previous.values() if r.get("output")}
    counters: dict[int, int] = {}

    def name_for(age: int) -> str:
        i = counters.get(age, 0)
        while f"{age}_{i}.png" in used_names:
            i += 1
        counters[age] = i + 1
        used_names.add(f"{age}_{i}.png")
        return f"{age}_{i}.png"

    records: list[dict] = []
    tasks: list[dict] = []
    first_of_hash: dict[str, str] = {}
    rels = {p.relative_to(inp).as_posix() for p in files}
    csv_keys_used: set[str] = set()
    for p in files:
        rel = p.relative_to(inp).as_posix()
        rec: dict = {"input": rel}
        try:
            rec["sha256"] = digest = sha256_file(p)
        except OSError as e:
            records.append({**rec, "kept": False, "status": "unreadable", "reason": f"cannot read {rel}: {e}"})
            continue
        if digest in first_of_hash:
            records.append({**rec, "kept": False, "status": "duplicate",
                            "reason": f"exact duplicate of {first_of_hash[digest]}"})
            continue
        first_of_hash[digest] = rel
        try:
            key = rel if rel in table else p.name if p.name in table else None
            if key is not None:
                csv_keys_used.add(key)
                age = table[key]
                if isinstance(age, AgeError):
                    raise age
                rec["age_source"] = "csv"
            else:
                age = age_from_name(p.name)
                rec["age_source"] = "file name" if age is not None else None
        except AgeError as e:
            records.append({**rec, "kept": False, "status": "bad_age", "reason": str(e)})
            continue
        if age is None and not estimate_ages:
            records.append({**rec, "kept": False, "status": "no_age",
                            "reason": "no age: name it {age}_….ext, list it in --ages, or pass --estimate-ages"})
            continue
        rec["age"] = age
        old = previous.get(digest)
        if old is not None and old.get("size") == size and (age is None or old.get("age") == age) and (
                not old.get("kept") or (old.get("output") and _output_exists(out, old["output"]))):
            records.append({**old, "input": rel, "skipped": "already done (same content hash)"})
            continue
        rec["size"] = size
        rec["output"] = name_for(age) if age is not None else None
        tasks.append({"path": str(p), "rec": rec, "out_dir": str(out), "size": size, "centre": None,
                      "defer": True})
    # DEX-estimated ages are named here, in the parent, after the workers return
    csv_missing = sorted(k for k in table if k not in csv_keys_used and k not in rels)
    for k in csv_missing:
        print(f"agingnet.prep: warning: {ages_csv} names {k!r}, which is not in {inp}", file=sys.stderr)

    def write_summary(recs: list[dict], complete: bool) -> dict:
        recs = sorted(recs, key=lambda r: r["input"])
        summary = {"input": str(inp), "size": size, "landmarks": landmarks, "complete": complete,
                   "ages_csv": str(ages_csv) if ages_csv else None, "csv_missing": csv_missing,
                   "actor_centre": centre is not None, "counts": _counts(recs), "inputs": recs}
        atomic_write_json(summary, out / SUMMARY)
        return summary

    # An interrupted run keeps what it finished: the summary is rewritten (atomically, at most every 2 s)
    # with every record that is final, so the next run skips those files by their hash.
    finished: list[dict] = []
    last_write = [time.monotonic()]

    def on_result(r: dict) -> None:
        if r["status"] != "deferred" and not (r.get("kept") and r.get("output") is None):
            finished.append(r)
        if time.monotonic() - last_write[0] >= CHECKPOINT_S:
            write_summary(records + finished, complete=False)
            last_write[0] = time.monotonic()

    centre = _actor_reference(actor, init_args) if actor else None
    for t in tasks:
        t["centre"] = centre
    done = _run(tasks, workers, init_args, "align", on_result)
    centre = centre or _actor_centre(records + done)
    deferred = [t for t, r in zip(tasks, done) if r["status"] == "deferred"]
    for t, r in zip(tasks, done):
        if r["status"] == "deferred":
            t.update(centre=centre, defer=False, faces=r["candidates"])
    again = iter(_run(deferred, workers, init_args, "align (several faces)", on_result))
    done = [next(again) if r["status"] == "deferred" else r for r in done]
    for r in done:
        if r.get("age_source") == "dex (estimated)" and r.get("kept") and r.get("output") is None:
            tmp = out / f".estimated_{r['sha256'][:16]}.png"
            r["output"] = name_for(r["age"])
            os.replace(tmp, out / r["output"])
    records += done

    return write_summary(records, complete=True)


def _actor_reference(actor: list[Path], init_args: tuple) -> list[float]:
    _init_worker(*init_args)
    embs = []
    for a in actor:
        faces = _MODELS.faces(read_photo(a)[0])
        if not faces:
            raise ValueError(f"--actor photo {a}: no face found")
        embs.append(max(faces, key=lambda f: f.area).embedding)
    return np.median(np.asarray(embs), axis=0).tolist()


def _counts(records: list[dict]) -> dict:
    c: dict[str, int] = {"inputs": len(records), "kept": sum(bool(r.get("kept")) for r in records),
                         "skipped_done": sum(bool(r.get("skipped")) for r in records)}
    for r in records:
        if not r.get("kept"):
            c[r["status"]] = c.get(r["status"], 0) + 1
    return c


def _load_previous(path: Path) -> dict[str, dict]:
    """Records of a previous run keyed by content hash ({} when there is none or it is unreadable)."""
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {r["sha256"]: r for r in data.get("inputs", []) if r.get("sha256") and r.get("status") != "duplicate"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
