"""Datasets as shipped: ``experiments/run.py ... mode=inspect`` on trees built in a temporary folder
with the real file names, split files and metadata from ``../shared/data/external/`` (read from
there, never copied into the repository) gives the official counts and names unreadable files."""
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

from conftest import REPO

EXT = os.path.join(os.path.dirname(REPO), "shared", "data", "external")
pytestmark = pytest.mark.skipif(not os.path.isdir(EXT), reason=f"{EXT} (the real split files) is not here")
sys.path.insert(0, os.path.join(REPO, "experiments"))


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def png(seed=0, side=40) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def inspect(tmp_path, *overrides):
    """Run the entry point's mode=inspect; return its inspect.json."""
    from run import main

    assert main([*overrides, "mode=inspect", f"run.root={tmp_path / 'runs'}", "run.name=inspect"]) == 0
    with open(tmp_path / "runs" / "inspect" / "inspect.json") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- trees with the real names
def ffpp_tree(root, manipulations=("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"), comp="c23", pairs=None,
              data=b"x"):
    """FF++ with the official ids (every pair of the split files, or the first ``pairs`` per split)."""
    ids = []
    for split in ("train", "val", "test"):
        with open(os.path.join(EXT, "faceforensics", "splits", f"{split}.json")) as f:
            ids += json.load(f)[:pairs]
    for a, b in ids:
        for v in (a, b):
            touch(os.path.join(root, "original_sequences", "youtube", comp, "videos", f"{v}.mp4"), data)
        for t in manipulations:
            for v in (f"{a}_{b}", f"{b}_{a}"):
                touch(os.path.join(root, "manipulated_sequences", t, comp, "videos", f"{v}.mp4"), data)
    return ids


def celebdf_tree(root, data=b"x", n_train=0):
    with open(os.path.join(EXT, "celebdf_v2", "List_of_testing_videos.txt")) as f:
        listed = [ln.split()[1] for ln in f if ln.strip()]
    for rel in listed:
        touch(os.path.join(root, rel), data)
    for i in range(n_train):
        touch(os.path.join(root, "Celeb-real", f"id{90 + i}_0000.mp4"), data)
        touch(os.path.join(root, "Celeb-synthesis", f"id{90 + i}_id{91 + i}_0000.mp4"), data)
    shutil.copy(os.path.join(EXT, "celebdf_v2", "List_of_testing_videos.txt"), os.path.join(root, "List_of_testing_videos.txt"))
    return listed


def dfdc_tree(root, data=b"x", limit=None):
    """The train-sample part (metadata.json) and the public test set as labels.csv (from
    sample_submission.csv's names) beside test/videos/."""
    with open(os.path.join(EXT, "dfdc", "train_sample_videos", "metadata.json")) as f:
        meta = json.load(f)
    names = sorted(meta)[:limit]
    meta = {n: meta[n] for n in names}
    touch(os.path.join(root, "train_sample_videos", "metadata.json"), json.dumps(meta).encode())
    for n in names:
        touch(os.path.join(root, "train_sample_videos", n), data)
    with open(os.path.join(EXT, "dfdc", "sample_submission.csv")) as f:
        lines = f.read().splitlines()[1:]
    lines = lines[:limit]
    labels = ["filename,label"] + [f"{ln.split(',')[0]},{i % 2}" for i, ln in enumerate(lines)]
    touch(os.path.join(root, "test", "labels.csv"), "\n".join(labels).encode())
    for ln in lines:
        touch(os.path.join(root, "test", "videos", ln.split(",")[0]), data)
    return meta, lines


def cifar_tree(root):
    """cifar-100-python pickles whose labels agree with the real index lists (rows of
    session_k.txt, k >= 2, are 5 classes x 5 shots in file order; session_1.txt's rows are the
    base classes 0..59); images are not needed to count."""
    idx = os.path.join(EXT, "cec_index_list", "cifar100")
    labels = np.full(50000, -1)
    base = [int(x) for x in open(os.path.join(idx, "session_1.txt")).read().split()]
    labels[base] = np.arange(len(base)) // 500
    for k in range(2, 10):
        rows = [int(x) for x in open(os.path.join(idx, f"session_{k}.txt")).read().split()]
        labels[rows] = 60 + 5 * (k - 2) + np.arange(len(rows)) // 5
    rest = np.flatnonzero(labels < 0)
    labels[rest] = 60 + np.arange(len(rest)) % 40
    for split, y in (("train", labels), ("test", np.arange(10000) % 100)):
        touch(os.path.join(root, "cifar-100-python", split),
              pickle.dumps({"fine_labels": [int(v) for v in y], "data": np.zeros((len(y), 3), np.uint8)}))


def mini_tree(root):
    """miniImageNet images for every row the protocol reads (1-byte stand-ins)."""
    import pandas as pd

    idx = os.path.join(EXT, "cec_index_list", "mini_imagenet")
    used = set()
    for k in range(1, 10):
        used |= {os.path.basename(ln.strip()) for ln in open(os.path.join(idx, f"session_{k}.txt")) if ln.strip()}
    used |= set(pd.read_csv(os.path.join(idx, "test.csv"))["filename"])
    d = os.path.join(root, "miniimagenet", "images")
    os.makedirs(d)
    for n in used:
        with open(os.path.join(d, n), "wb") as f:
            f.write(b"x")


def cub_tree(root, test_per_class=3):
    """CUB_200_2011 tables listing the index lists' training images and ``test_per_class`` test
    images per class (stand-in names: the real test names are not in the index lists)."""
    idx = os.path.join(EXT, "cec_index_list", "cub200")
    train = []
    for k in range(1, 12):
        train += [ln.strip()[ln.index("images/") + 7:] for ln in open(os.path.join(idx, f"session_{k}.txt")) if ln.strip()]
    classes = sorted({t.split("/")[0] for t in train}, key=lambda c: int(c.split(".")[0]))
    test = [f"{c}/test_{i}.jpg" for c in classes for i in range(test_per_class)]
    base = os.path.join(root, "CUB_200_2011")
    ims, tt, cl = [], [], []
    for i, (rel, is_train) in enumerate([(t, 1) for t in train] + [(t, 0) for t in test], start=1):
        ims.append(f"{i} {rel}")
        tt.append(f"{i} {is_train}")
        cl.append(f"{i} {int(rel.split('.')[0])}")
        touch(os.path.join(base, "images", rel))
    for name, lines in (("images.txt", ims), ("train_test_split.txt", tt), ("image_class_labels.txt", cl)):
        touch(os.path.join(base, name), ("\n".join(lines) + "\n").encode())


def genimage_tree(root, per=3, side=40):
    """Every GenImage generator's {train,val}/{ai,nature} with ``per`` PNGs each, plus the files
    GenImage's corrupted_files lists name, written as corrupt bytes."""
    from trustlab.platform.data.images import GENIMAGE_GENERATORS, read_exclude_lists

    k = 0
    for g in GENIMAGE_GENERATORS:
        for part in ("train", "val"):
            for kind in ("ai", "nature"):
                for i in range(per):
                    k += 1
                    touch(os.path.join(root, g, part, kind, f"{kind}_{i:03d}.png"), png(k, side))
    listed = sorted(read_exclude_lists(os.path.join(EXT, "genimage", "corrupted_files")))
    for rel in listed:
        touch(os.path.join(root, rel), b"\x89PNG\r\n\x1a\n truncated")
    return listed


# ----------------------------------------------------------------------------- inspect: official counts
def test_ffpp_c23_official_counts_from_a_splits_folder(tmp_path):
    root = tmp_path / "ffpp"
    ffpp_tree(str(root))
    ffpp_tree(str(root), manipulations=("FaceShifter",))
    r = inspect(tmp_path, "method=stdt", "data=ffpp", f"data.root={root}",
                f"data.splits={EXT}/faceforensics/splits", "inspect.verify=exists")
    c = r["counts"]
    for split, n in (("train", 720), ("val", 140), ("test", 140)):
        assert c["by_manipulation"][split]["0"] == {"none": n}
        # the four standard manipulations by default (FaceShifter is on disk but not asked for)
        assert c["by_manipulation"][split]["1"] == {t: n for t in ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")}
    assert c["rows"] == 5 * 1000 and r["unreadable"] == []
    with_fs = inspect(tmp_path, "method=stdt", "data=ffpp", f"data.root={root}", f"data.splits={EXT}/faceforensics/splits",
                      "inspect.verify=none", "data.adapter.manipulations=[Deepfakes,FaceShifter]")
    assert with_fs["counts"]["by_manipulation"]["test"]["1"] == {"Deepfakes": 140, "FaceShifter": 140}
    from trustlab.platform.data.manifests import ManifestError

    with pytest.raises(ManifestError, match="official download has no splits/ folder; set data.splits"):
        inspect(tmp_path, "method=stdt", "data=ffpp", f"data.root={root}")
    with pytest.raises(ManifestError, match="c40"):
        inspect(tmp_path, "method=stdt", "data=ffpp", f"data.root={root}", f"data.splits={EXT}/faceforensics/splits",
                "data.adapter.compressions=[c40]")


def test_celebdf_v2_test_is_178_real_and_340_fake(tmp_path):
    root = tmp_path / "celebdf"
    celebdf_tree(str(root), n_train=4)
    (root / "Celeb-synthesis" / "id0_id16_0000.mp4").write_bytes(b"")  # a listed test video, zero bytes
    r = inspect(tmp_path, "method=stdt", "data=celebdf", f"data.root={root}", "inspect.verify=exists")
    assert r["counts"]["by_split_label"]["test"] == {"0": 178, "1": 340}
    assert r["counts"]["by_source"]["test"]["0"] == {"celebdf/Celeb-real": 108, "celebdf/YouTube-real": 70}
    assert [b["uri"].endswith("Celeb-synthesis/id0_id16_0000.mp4") for b in r["unreadable"]] == [True]
    assert r["unreadable"][0]["reason"] == "zero-byte file"


def test_dfdc_test_set_from_labels_csv(tmp_path):
    root = tmp_path / "dfdc"
    meta, test = dfdc_tree(str(root))
    r = inspect(tmp_path, "method=stdt", "data=dfdc", f"data.root={root}", "inspect.verify=exists")
    c = r["counts"]
    assert sum(c["by_split_label"]["test"].values()) == len(test) == 400
    assert c["by_split_label"]["test"] == {"0": 200, "1": 200}
    assert c["by_source"]["test"] == {"0": {"dfdc/test": 200}, "1": {"dfdc/test": 200}}
    labelled = {s: v for s, v in c["by_split_label"].items() if s != "test"}
    assert sum(v.get("0", 0) for v in labelled.values()) == 77 and sum(v.get("1", 0) for v in labelled.values()) == 323
    assert set(labelled) == {"train", "val"}
    from trustlab.platform.data.manifests import ManifestError

    with pytest.raises(ManifestError, match=r"without metadata.json or labels.csv: \['dfdc_train_part_9'\]"):
        inspect(tmp_path, "method=stdt", "data=dfdc", f"data.root={root}", "data.adapter.val_parts=[dfdc_train_part_9]")


FSCIL_TREES = {  # data group -> (tree, method, base classes, sessions, ways, base training images, test images per class)
    "cifar100": (cifar_tree, "cd2", 60, 8, 5, 30000, 100),  # base = classes 0..59 by label, as CEC reads it
    "mini_imagenet": (mini_tree, "sdc", 60, 8, 5, 30000, 100),
    "cub200": (cub_tree, "cd2", 100, 10, 10, 3000, 3),
}


@pytest.mark.parametrize("name", list(FSCIL_TREES))
def test_fscil_benchmarks_read_as_cec(tmp_path, name):
    tree, method, n_base, n_sessions, ways, base_images, test_per_class = FSCIL_TREES[name]
    root = tmp_path / name
    tree(str(root))
    r = inspect(tmp_path, f"method={method}", f"data={name}", f"data.root={root}", "inspect.verify=exists",
                f"data.index_dir={EXT}/cec_index_list/{name}", "method.data.val_per_class=0")
    s = r["counts"]["sessions"]
    assert s[0]["classes"] == n_base and s[0]["train_images"] == base_images
    assert [(x["classes"], x["min_shots"], x["max_shots"]) for x in s[1:]] == [(ways, 5, 5)] * n_sessions
    assert all(x["test_images"] == test_per_class * x["classes"] for x in s) and r["unreadable"] == []


def test_genimage_per_generator_protocols_and_corrupt_files_named(tmp_path):
    from trustlab.platform.data.images import GENIMAGE_GENERATORS

    root = tmp_path / "genimage"
    listed = genimage_tree(str(root))
    r = inspect(tmp_path, "method=f2c", "data=genimage", f"data.root={root}")
    c = r["counts"]
    # one_to_all: train (+ carved val) on SD v1.4 only; test = every generator's val folder
    assert set(c["by_generator"]["train"]["1"]) == {"imagenet_ai_0419_sdv4"}
    assert c["by_generator"]["test"]["1"] == {g: 3 for g in GENIMAGE_GENERATORS}
    assert c["by_generator"]["test"]["0"] == {g: 3 for g in GENIMAGE_GENERATORS}
    sd_listed = [x for x in listed if x.startswith("imagenet_ai_0419_sdv4/train/")]
    assert sorted(b["uri"][len(str(root)) + 1:] for b in r["unreadable"]) == sd_listed
    assert all(b["reason"] for b in r["unreadable"])  # e.g. a truncated PNG
    ex = inspect(tmp_path, "method=f2c", "data=genimage", f"data.root={root}", f"data.adapter.exclude={EXT}/genimage/corrupted_files")
    assert ex["unreadable"] == [] and ex["excluded"] == len(sd_listed)
    loo = inspect(tmp_path, "method=f2c", "data=genimage", f"data.root={root}", "data.adapter.protocol=leave_one_out",
                  "data.adapter.held_out=imagenet_midjourney", "inspect.verify=none")
    assert set(loo["counts"]["by_generator"]["test"]["1"]) == {"imagenet_midjourney"}
    assert len(set(loo["counts"]["by_generator"]["train"]["0"])) == 7
    n_train = sum(loo["counts"]["by_split"][s] for s in ("train", "val"))
    assert n_train == 7 * 6 + len([x for x in listed if not x.startswith("imagenet_midjourney/")])


def test_cnnspot_example_set_and_aigcdetect_layout(tmp_path):
    r = inspect(tmp_path, "method=f2c", "data=cnnspot", f"data.root={EXT}/cnndetection/examples")
    assert r["counts"]["by_split_label"] == {"test": {"0": 1, "1": 1}} and r["unreadable"] == []
    assert r["counts"]["by_generator"]["test"]["1"] == {"realfakedir": 1}
    root = tmp_path / "aigc"
    for s, classes in (("progan", ("car", "cat")), ("Midjourney", ("",))):
        for cls in classes:
            for f, lab in (("0_real", 0), ("1_fake", 1)):
                touch(os.path.join(root, s, cls, f, f"{lab}.png"), png(lab))
    a = inspect(tmp_path, "method=f2c", "data=aigcdetect", f"data.root={root}")
    assert a["counts"]["by_generator"]["test"]["1"] == {"progan": 2, "Midjourney": 1}


def test_inspect_names_the_weights_it_would_load(tmp_path):
    import torch

    w = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, w)
    r = inspect(tmp_path, "method=f2c", "data=cnnspot", f"data.root={EXT}/cnndetection/examples", f"method.weights={w}")
    from trustlab.platform.weights import sha256

    assert r["weights"] == [{"key": "method.weights", "source": str(w), "file": str(w), "sha256": sha256(str(w)),
                             "bytes": os.path.getsize(w)}]
    bad = inspect(tmp_path, "method=f2c", "data=cnnspot", f"data.root={EXT}/cnndetection/examples",
                  f"method.weights={tmp_path / 'missing.safetensors'}")
    assert "not found" in bad["weights"][0]["error"]
    cfg_text = (tmp_path / "runs" / "inspect" / "config.yaml").read_text()
    assert "provenance:" in cfg_text and "missing.safetensors" in cfg_text
