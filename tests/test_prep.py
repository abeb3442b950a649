"""``python -m agingnet.prep``: align / filter / split / report on the astronaut (a real face) and synthetic
faces pasted into larger canvases with known rotation, scale and offset (fixtures in tests/prep_photos.py).

dlib runs once per module: the raw folder is aligned and filtered by one module-scoped fixture."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from prep_photos import BLUR, astronaut, synthetic, write_raw_folder  # noqa: E402

pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")

from agingnet.prep.__main__ import main  # noqa: E402
from agingnet.prep.ages import AgeError, age_from_name, read_ages_csv  # noqa: E402
from agingnet.prep.filtering import FilterConfig, decide, sharpness  # noqa: E402
from agingnet.prep.splitting import assign  # noqa: E402

SIZE = 256
FILTER_ARGS = ["--min-face", "190"]  # the actor's photos have a crop side ≈ 216 px, 46_small ≈ 173 px


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv: list[str]) -> None:
    main([str(a) for a in argv])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    raw, aligned = root / "raw", root / "aligned"
    expected = write_raw_folder(raw)
    # headerless CSV: 2 columns = file,age; 3 columns = file,birth_year,photo_year
    csv = root / "ages.csv"
    csv.write_text("still_07.png,39\nstill_08.png,-3\nstill_09.png,1962,2003\nghost.png,40\n")
    before = _hashes(raw)
    _cli(["align", "--input", raw, "--out", aligned, "--ages", csv, "--size", SIZE, "--landmarks", "dlib",
          "--upsample", "0"])
    summary = json.loads((aligned / "prep_summary.json").read_text())
    aligned_names = sorted(p.name for p in aligned.glob("*.png"))
    _cli(["filter", aligned, *FILTER_ARGS])
    report = json.loads((aligned / "_rejected" / "filter_report.json").read_text())
    return {"root": root, "raw": raw, "aligned": aligned, "csv": csv, "expected": expected, "before": before,
            "summary": summary, "aligned_names": aligned_names, "report": report,
            "rec": {r["input"]: r for r in summary["inputs"]}}


# ------------------------------------------------------------------------------------------------ align


def test_summary_lists_every_input_with_its_fate(prepared):
    rec = prepared["rec"]
    assert sorted(rec) == sorted(p.relative_to(prepared["raw"]).as_posix()
                                 for p in prepared["raw"].rglob("*") if p.is_file())
    status = {k: r["status"] for k, r in rec.items()}
    assert status == {
        "30_ref.png": "aligned", "31_copy.jpg": "aligned", "31_turned.jpg": "duplicate",
        "33_cmyk.jpg": "aligned", "34_grey16.png": "aligned", "36_grey.png": "aligned", "37_rgba.png": "aligned",
        "38_exif.jpg": "aligned", "40_large.png": "aligned", "41_near.jpg": "aligned", "42_shifted.png": "aligned",
        "44_blurred.png": "aligned", "46_small.png": "aligned", "48_other.png": "aligned",
        "50_two_faces.png": "aligned", "52_noface.png": "no_face", "53_broken.png": "not_image",
        "notes.txt": "no_age", "150_typo.png": "bad_age", "IMG_0001.png": "no_age", "still_07.png": "aligned",
        "still_08.png": "bad_age", "still_09.png": "aligned"}
    assert rec["31_turned.jpg"]["reason"] == "exact duplicate of 31_copy.jpg"
    # every kept input has its file, named {age}_{idx}.png, and nothing else was written
    kept = {r["output"] for r in rec.values() if r["kept"]}
    assert kept == set(prepared["aligned_names"])
    for r in rec.values():
        if r["kept"]:
            assert r["output"].split("_")[0] == str(r["age"])
            assert r["output"].startswith(r["input"].split("_")[0]) or r["age_source"] == "csv"
    c = prepared["summary"]["counts"]
    assert c["inputs"] == len(rec) == 23 and c["kept"] == 16


def test_alignment_recovers_the_pasted_geometry(prepared):
    """Pasting applies q = M·(p, 1) with M = [s·R(θ) | t]: the FFHQ square must turn by θ, scale by s and
    have its centre at M·(centre of the reference, 1)."""
    rec = prepared["rec"]
    ref = rec["30_ref.png"]
    for name, g in prepared["expected"]["geometry"].items():
        r = rec[name] if rec[name]["status"] != "duplicate" else rec["31_copy.jpg"]
        m = np.asarray(g["M"])
        want_centre = m[:, :2] @ np.asarray(ref["centre"]) + m[:, 2]
        assert r["angle_deg"] == pytest.approx(ref["angle_deg"] + g["angle"], abs=1.5), name
        assert r["face_size"] == pytest.approx(ref["face_size"] * g["scale"], rel=0.03), name
        assert np.abs(np.asarray(r["centre"]) - want_centre).max() < 0.03 * r["face_size"], name
    out = Image.open(prepared["aligned"] / ref["output"])
    assert out.size == (SIZE, SIZE) and out.mode == "RGB"


def test_awkward_encodings_are_decoded(prepared):
    rec, aligned = prepared["rec"], prepared["aligned"]
    assert rec["33_cmyk.jpg"]["mode"] == "CMYK" and rec["34_grey16.png"]["mode"].startswith("I")
    assert rec["36_grey.png"]["mode"] == "L" and rec["37_rgba.png"]["mode"] == "RGBA"
    # EXIF orientation 6 honoured: upright, so the face is found and only slightly tilted (mirrored astronaut)
    exif = rec["38_exif.jpg"]
    assert exif["exif_orientation"] == 6 and (exif["width"], exif["height"]) == (320, 320)
    assert exif["angle_deg"] == pytest.approx(-rec["30_ref.png"]["angle_deg"], abs=1.5)
    # 16-bit samples are scaled, not clipped to white: the aligned face matches the 8-bit grey version
    g16 = np.asarray(Image.open(_find(aligned, rec["34_grey16.png"]["output"])).convert("L"), dtype=float)
    src = np.asarray(astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("L"), dtype=float)
    assert abs(g16.mean() - src.mean()) < 12 and g16.std() > 30


def _find(aligned: Path, name: str) -> Path:
    hits = [p for p in aligned.rglob(name)]
    assert len(hits) == 1, f"{name}: {hits}"
    return hits[0]


def test_two_faces_keep_the_actor_not_the_larger_stranger(prepared):
    r = prepared["rec"]["50_two_faces.png"]
    assert r["faces"] == 2 and r["chosen_by"] == "nearest the actor's identity"
    assert r["centre"][0] < 450  # the astronaut is on the left half, the larger synthetic face on the right
    assert "_rejected" not in _find(prepared["aligned"], r["output"]).parts


def test_several_faces_without_a_centre_keep_the_largest_unless_an_actor_photo_is_given(prepared, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(prepared["raw"] / "50_two_faces.png", raw)
    common = ["--size", 64, "--landmarks", "dlib", "--upsample", 0]
    _cli(["align", "--input", raw, "--out", tmp_path / "a", *common])
    _cli(["align", "--input", raw, "--out", tmp_path / "b", "--actor", prepared["raw"] / "30_ref.png", *common])
    largest = json.loads((tmp_path / "a" / "prep_summary.json").read_text())["inputs"][0]
    actor = json.loads((tmp_path / "b" / "prep_summary.json").read_text())["inputs"][0]
    assert largest["chosen_by"] == "largest face" and largest["centre"][0] > 450  # the synthetic stranger
    assert actor["chosen_by"] == "nearest the actor's identity" and actor["centre"][0] < 450


def test_ages_from_names_and_csv(prepared):
    rec = prepared["rec"]
    assert "150" in rec["150_typo.png"]["reason"] and "0–100" in rec["150_typo.png"]["reason"]
    assert "still_08.png" in rec["still_08.png"]["reason"] and "'-3'" in rec["still_08.png"]["reason"]
    assert rec["still_07.png"]["age"] == 39 and rec["still_07.png"]["age_source"] == "csv"
    assert rec["still_09.png"]["age"] == 2003 - 1962
    assert prepared["summary"]["csv_missing"] == ["ghost.png"]


def test_inputs_are_never_modified(prepared):
    assert _hashes(prepared["raw"]) == prepared["before"]


def test_second_align_skips_finished_files(prepared, capsys):
    aligned = prepared["aligned"]
    mtimes = {p: p.stat().st_mtime_ns for p in aligned.rglob("*.png")}
    _cli(["align", "--input", prepared["raw"], "--out", aligned, "--ages", prepared["csv"], "--size", SIZE,
          "--landmarks", "dlib", "--upsample", "0"])
    again = json.loads((aligned / "prep_summary.json").read_text())
    # the kept faces and the two failures (no face, broken file) are recognised by their hash, not redone
    assert again["counts"]["kept"] == 16 and again["counts"]["skipped_done"] == 18
    assert {p: p.stat().st_mtime_ns for p in aligned.rglob("*.png")} == mtimes  # nothing rewritten, no new file
    assert "16 of 23 inputs kept, 18 skipped as already processed" in capsys.readouterr().out


def test_interrupted_align_keeps_what_it_finished(tmp_path, monkeypatch):
    from agingnet.prep import aligning

    raw = tmp_path / "raw"
    raw.mkdir()
    for age, g in ((30, 0.8), (31, 1.0), (32, 1.25)):
        astronaut().point(lambda v, g=g: round(255 * (v / 255) ** g)).save(raw / f"{age}_x.png")
    calls = []
    real = aligning.process_one

    def flaky(task):
        calls.append(task["path"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(aligning, "CHECKPOINT_S", 0.0)
    monkeypatch.setattr(aligning, "process_one", flaky)
    args = dict(size=64, landmarks="dlib", upsample=0)
    with pytest.raises(KeyboardInterrupt):
        aligning.run_align(raw, tmp_path / "out", **args)
    partial = json.loads((tmp_path / "out" / "prep_summary.json").read_text())
    assert partial["complete"] is False and [r["output"] for r in partial["inputs"]] == ["30_0.png", "31_0.png"]
    monkeypatch.setattr(aligning, "process_one", real)
    summary = aligning.run_align(raw, tmp_path / "out", **args)
    assert summary["complete"] and summary["counts"]["skipped_done"] == 2 and summary["counts"]["kept"] == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["30_0.png", "31_0.png", "32_0.png"]


def test_two_workers_give_the_same_files(prepared, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("30_ref.png", "40_large.png", "42_shifted.png"):
        shutil.copy(prepared["raw"] / name, raw / name)
    _cli(["align", "--input", raw, "--out", tmp_path / "out", "--size", SIZE, "--workers", 2, "--landmarks",
          "dlib", "--upsample", "0"])
    for name in ("30_ref.png", "40_large.png", "42_shifted.png"):
        out = prepared["rec"][name]["output"]
        a = np.asarray(Image.open(tmp_path / "out" / out))
        b = np.asarray(Image.open(_find(prepared["aligned"], out)))
        assert np.array_equal(a, b), name


# ------------------------------------------------------------------------------------------------ filter


def test_each_reject_lands_in_its_reason_folder(prepared):
    rec, aligned = prepared["rec"], prepared["aligned"]
    expect = {"44_blurred.png": "blurry", "46_small.png": "too_small", "48_other.png": "identity_outlier",
              "40_large.png": "near_duplicate"}  # 41_near.jpg is its (sharper) JPEG twin and stays
    for name, reason in expect.items():
        assert (aligned / "_rejected" / reason / rec[name]["output"]).is_file(), name
    rejected = {p.name for p in (aligned / "_rejected").rglob("*.png")}
    assert rejected == {rec[n]["output"] for n in expect}
    kept = {p.name for p in aligned.glob("*.png")}
    assert kept | rejected == set(prepared["aligned_names"]) and not kept & rejected
    verdicts = {v["file"]: v["reason"] for v in prepared["report"]["faces"]}
    assert verdicts == {n: next((r for k, r in expect.items() if rec[k]["output"] == n), None)
                        for n in prepared["aligned_names"]}
    dup = next(v for v in prepared["report"]["faces"] if v["reason"] == "near_duplicate")
    assert dup["duplicate_of"] == rec["41_near.jpg"]["output"]


def test_second_filter_keeps_listing_earlier_rejects(prepared, monkeypatch):
    from agingnet.prep import filtering

    def no_models(*a, **k):
        raise AssertionError("faces measured again: the filter cache was not used")

    monkeypatch.setattr(filtering, "FaceModels", no_models)
    _cli(["filter", prepared["aligned"], *FILTER_ARGS])
    report = json.loads((prepared["aligned"] / "_rejected" / "filter_report.json").read_text())
    assert report["counts"]["rejected_earlier"] == 4 and report["counts"]["kept"] == 12
    assert sorted(f["file"] for f in report["faces"]) == prepared["aligned_names"]


def test_decide_against_hand_computed_cut():
    """Seven faces; the first is too small, the second blurry. The other five lie on a line in embedding space
    at x = 0, 0.1, −0.1, 0.2, 0.9: centre = median = 0.1, d = 0.1, 0, 0.2, 0.1, 0.8, median(d) = 0.1,
    MAD = median(0, 0.1, 0.1, 0, 0.7) = 0.1, cut = max(0.3, 0.1 + 2·1.4826·0.1) = 0.39652: only 0.9 is out."""
    emb = np.zeros((7, 128))
    emb[:, 0] = [5.0, -5.0, 0.0, 0.1, -0.1, 0.2, 0.9]
    names = [f"{i}_0.png" for i in range(7)]
    thumbs = np.random.default_rng(0).random((7, 64, 64))
    cfg = FilterConfig(outlier_k=2.0, outlier_floor=0.3, blur_threshold=10.0, min_face=100.0)
    sizes = {"0_0.png": 99.0, "1_0.png": 100.0}
    out = decide(names, sizes, np.array([50.0, 5.0, 50, 50, 50, 50, 50]), emb, thumbs, cfg)
    assert [o["reason"] for o in out] == ["too_small", "blurry", None, None, None, None, "identity_outlier"]
    assert out[6]["outlier_cut"] == pytest.approx(0.1 + 2 * 1.4826 * 0.1, abs=1e-4)
    assert [o.get("centre_distance") for o in out[2:]] == pytest.approx([0.1, 0.0, 0.2, 0.1, 0.8], abs=1e-6)
    # a near-duplicate pair: embeddings 0.05 apart and identical thumbnails; the sharper one stays
    emb2, thumbs2 = emb[2:5].copy(), thumbs[2:5].copy()
    emb2[1, 0], thumbs2[1] = 0.05, thumbs2[0]
    out = decide(names[:3], {}, np.array([50.0, 60.0, 50.0]), emb2, thumbs2, cfg)
    assert [o["reason"] for o in out] == ["near_duplicate", None, None] and out[0]["duplicate_of"] == "1_0.png"


def test_sharpness_is_the_variance_of_the_laplacian():
    img = synthetic(1, 256)
    g = np.asarray(img.convert("L").resize((256, 256), Image.Resampling.LANCZOS), dtype=np.float64)
    from agingnet.landmarks import TEMPLATE_68

    uv = np.asarray(TEMPLATE_68) * 256
    (l, t), (r, b) = np.floor(uv.min(0)).astype(int), np.ceil(uv.max(0)).astype(int)
    crop = np.pad(g[t:b, l:r], 1, mode="reflect")  # OpenCV's default border: reflect-101
    lap = crop[:-2, 1:-1] + crop[2:, 1:-1] + crop[1:-1, :-2] + crop[1:-1, 2:] - 4 * crop[1:-1, 1:-1]
    assert sharpness(img) == pytest.approx(lap.var(), rel=1e-9)
    from PIL import ImageFilter

    assert sharpness(img.filter(ImageFilter.GaussianBlur(BLUR))) < 0.2 * sharpness(img)


# ------------------------------------------------------------------------------------------ split, report


def _aged_folder(folder: Path, ages: list[int]) -> None:
    folder.mkdir(parents=True)
    tile = Image.new("RGB", (16, 16), (120, 90, 60))
    for i, a in enumerate(ages):
        tile.save(folder / f"{a}_{i}.png")


AGES = [21, 22, 23, 24, 26, 31, 32, 38, 44, 44, 44, 45, 47, 55, 61, 62, 63, 64, 64, 64, 70]


def test_split_is_stratified_and_reproducible(tmp_path):
    src = tmp_path / "faces"
    _aged_folder(src, AGES)
    for out in ("a", "b", "c"):
        _cli(["split", src, "--out", tmp_path / out, "--test-fraction", 0.25, "--seed", 7 if out != "c" else 8])

    def listing(out):
        return tuple(sorted(p.name for p in (tmp_path / out / s).iterdir()) for s in ("shot_train", "shot_test"))

    train, test = listing("a")
    assert listing("b") == (train, test) and listing("c") != (train, test)
    assert sorted(train + test) == sorted(p.name for p in src.iterdir()) and not set(train) & set(test)
    bins: dict[int, list[str]] = {}
    for name in train + test:
        bins.setdefault(int(name.split("_")[0]) // 5, []).append(name)
    for b, names in bins.items():
        n_test = sum(n in test for n in names)
        if len(names) >= 2:  # expected per bin, written out: min(max(round(0.25 n), 1), n − 1)
            assert n_test == min(max(round(0.25 * len(names)), 1), len(names) - 1), b
        else:
            assert n_test == 0, b
    assert len(list(src.iterdir())) == len(AGES)  # copied, not moved


def test_assign_bins_by_five_years():
    is_test = assign([20, 24, 25, 29], 0.5, seed=0)  # bins {20, 24} and {25, 29}: one test photo each
    assert sum(is_test[:2]) == 1 and sum(is_test[2:]) == 1


def test_report_counts_histogram_and_contact_sheet(tmp_path, capsys):
    src = tmp_path / "faces"
    _aged_folder(src, AGES)
    _cli(["split", src, "--out", tmp_path / "data", "--seed", 1])
    _cli(["report", tmp_path / "data"])
    rep = json.loads((tmp_path / "data" / "report" / "report.json").read_text())
    assert rep["train"] + rep["test"] == len(AGES)
    by_bin: dict[str, int] = {}
    for a in AGES:
        k = f"{a // 5 * 5}-{a // 5 * 5 + 4}"
        by_bin[k] = by_bin.get(k, 0) + 1
    assert {k: v["shot_train"] + v["shot_test"] for k, v in rep["counts"].items()} == by_bin
    hist = Image.open(tmp_path / "data" / "report" / "age_histogram.png")
    sheet = Image.open(tmp_path / "data" / "report" / "contact_sheet.png")
    assert hist.width > 100 and sheet.size == (8 * 128, math.ceil(len(AGES) / 8) * 144)
    assert "| 60-64 |" in capsys.readouterr().out


def test_personal_config_reads_the_split_folders(tmp_path):
    from hydra.utils import instantiate

    from agingnet.config import compose_config

    _aged_folder(tmp_path / "faces", AGES)
    _cli(["split", tmp_path / "faces", "--out", tmp_path / "data"])
    cfg = compose_config(["data=personal", f"paths.data_dir={tmp_path / 'data'}"], output_dir=tmp_path / "run")
    train, val = instantiate(cfg.data.train), instantiate(cfg.data.val)
    assert {Path(p).name for p in train.paths} == {p.name for p in (tmp_path / "data" / "shot_train").iterdir()}
    assert len(train) + len(val) == len(AGES) and sorted(train.ages + val.ages) == sorted(map(float, AGES))


# ------------------------------------------------------------------------------------------ bad input


def test_read_ages_csv_layouts(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("file,birth_year,photo_year\nx.jpg,1960,2001\ny.jpg,2001,1960\n")
    t = read_ages_csv(p)
    assert t["x.jpg"] == 41 and isinstance(t["y.jpg"], AgeError) and "-41" in str(t["y.jpg"])
    p.write_text("file,age\nx.jpg,40.5\n")
    assert "whole number" in str(read_ages_csv(p)["x.jpg"])
    p.write_text("x.jpg,40,1,2\n")
    with pytest.raises(ValueError, match="a.csv line 1"):
        read_ages_csv(p)
    assert age_from_name("40_3.png") == 40 and age_from_name("IMG_0001.jpg") is None
    with pytest.raises(AgeError, match="2019"):
        age_from_name("2019_party.jpg")


@pytest.mark.parametrize("case", ["out_inside_input", "missing_input", "missing_csv", "bad_fraction",
                                  "split_into_full", "filter_missing", "estimate_without_dex"])
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    raw = tmp_path / "raw"
    _aged_folder(raw, [30, 40])
    before = _hashes(raw)
    argv = {
        "out_inside_input": ["align", "--input", raw, "--out", raw / "aligned"],
        "missing_input": ["align", "--input", tmp_path / "nope", "--out", tmp_path / "o"],
        "missing_csv": ["align", "--input", raw, "--out", tmp_path / "o", "--ages", tmp_path / "ages.csv"],
        "bad_fraction": ["split", raw, "--out", tmp_path / "d", "--test-fraction", 1.5],
        "split_into_full": ["split", raw, "--out", tmp_path / "d"],
        "filter_missing": ["filter", tmp_path / "nope"],
        "estimate_without_dex": ["align", "--input", raw, "--out", tmp_path / "o", "--estimate-ages"],
    }[case]
    if case == "split_into_full":
        _aged_folder(tmp_path / "d" / "shot_train", [50])
    with pytest.raises(SystemExit) as e:
        _cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agingnet.prep: error: ")
    named = {"out_inside_input": "aligned", "missing_input": "nope", "missing_csv": "ages.csv",
             "bad_fraction": "1.5", "split_into_full": "shot_train", "filter_missing": "nope",
             "estimate_without_dex": "--dex"}[case]
    assert named in err[0]
    assert _hashes(raw) == before and not (raw / "aligned").exists()


def test_estimate_ages_with_dex(tmp_path):
    """A tiny random DEX stands in for the real weights: the age is estimated, flagged, and names the file."""
    import torch

    from agingnet.nn.dex import DEX

    torch.manual_seed(0)
    dex = tmp_path / "dex.pth"
    torch.save({"state_dict": DEX(widths=(4, 4, 4, 4, 4), fc_dim=8, input_size=32).state_dict()}, dex)
    raw = tmp_path / "raw"
    raw.mkdir()
    astronaut().save(raw / "portrait.png")
    _cli(["align", "--input", raw, "--out", tmp_path / "o", "--size", 64, "--estimate-ages", "--dex", dex,
          "--landmarks", "dlib", "--upsample", "0"])
    r = json.loads((tmp_path / "o" / "prep_summary.json").read_text())["inputs"][0]
    assert r["age_source"] == "dex (estimated)" and 0 <= r["age"] <= 100
    assert (tmp_path / "o" / r["output"]).is_file() and r["output"] == f"{r['age']}_0.png"
    assert not list((tmp_path / "o").glob(".*"))
