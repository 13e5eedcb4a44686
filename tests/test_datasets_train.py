"""Each dataset as shipped trains for one epoch through ``experiments/run.py`` (the smallest method
that reads it, its ci_overrides, Ray Train on the session's cluster), on a tiny tree with the real
layout and real file names (tiny stand-in media). The run folder names the weights it started
from and the files it could not read."""
import json
import os
import pickle

import numpy as np
import pytest

from conftest import ci_overrides
from test_datasets import EXT, celebdf_tree, dfdc_tree, ffpp_tree, genimage_tree, png, touch

pytestmark = pytest.mark.skipif(not os.path.isdir(EXT), reason=f"{EXT} (the real split files) is not here")


def face_mp4s(tmp_path) -> tuple[bytes, bytes]:
    """A real and a face-swapped tiny H.264 clip (8 frames, 96 px)."""
    from trustlab.methods.video.synth_video import face_patches, render_video, write_mp4

    faces = face_patches()
    out = []
    for i, manip in enumerate(("none", "blend")):
        rng = np.random.default_rng(i)
        frames = render_video(rng, faces[0][1], faces[1 % len(faces)][1], manip, 8, 96)
        p = str(tmp_path / f"clip{i}.mp4")
        write_mp4(frames, p)
        out.append(open(p, "rb").read())
    return out[0], out[1]


def _fill_videos(root, real: bytes, fake: bytes, fake_dirs=("manipulated_sequences", "Celeb-synthesis")):
    """Write the clips over the tree's stand-in files (fakes where the path says so)."""
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".mp4"):
                p = os.path.join(d, f)
                fake_path = any(k in p for k in fake_dirs)
                open(p, "wb").write(fake if fake_path else real)


VIDEO = ["method=stdt", *ci_overrides("stdt"), "method.data.backend=dataplane", "method.data.targets=[]",
         "method.robustness.enabled=false", "data.num_decoders=1", "data.decode_cpus=0.5"]
FSCIL = ["method=cd2", *ci_overrides("cd2"), "method.base.epochs=1", "method.data.protocol={n_base:4,n_sessions:2,ways:2,shots:2}",
         "method.data.val_per_class=1", "method.data.size=16", "method.ddm.steps=5"]
TINY_P = dict(n_base=4, n_sessions=2, ways=2, shots=2)


def _ffpp(tmp, real, fake):
    root = tmp / "ffpp"
    ffpp_tree(str(root), manipulations=("Deepfakes",), pairs=1)
    _fill_videos(root, real, fake)
    return [*VIDEO, "data=ffpp", f"data.root={root}", f"data.splits={EXT}/faceforensics/splits",
            "data.adapter.manipulations=[Deepfakes]"]


def _celebdf(tmp, real, fake):
    root = tmp / "celebdf"
    listed = celebdf_tree(str(root), n_train=3)
    keep = [ln for ln in open(root / "List_of_testing_videos.txt").read().splitlines() if "Celeb-real" in ln][:2] + \
           [ln for ln in open(root / "List_of_testing_videos.txt").read().splitlines() if "synthesis" in ln][:2]
    for rel in listed:  # a tiny test list: four lines of the official one
        if not any(rel in k for k in keep):
            os.remove(root / rel)
    (root / "List_of_testing_videos.txt").write_text("\n".join(keep) + "\n")
    _fill_videos(root, real, fake)
    return [*VIDEO, "data=celebdf", f"data.root={root}", "data.adapter.val_fraction=0.4"]


def _dfdc(tmp, real, fake):
    root = tmp / "dfdc"
    meta, test = dfdc_tree(str(root), limit=8)
    for n, m in meta.items():
        open(root / "train_sample_videos" / n, "wb").write(fake if m["label"] == "FAKE" else real)
    for i, ln in enumerate(test):
        open(root / "test" / "videos" / ln.split(",")[0], "wb").write(fake if i % 2 else real)
    return [*VIDEO, "data=dfdc", f"data.root={root}", "data.adapter.val_fraction=0.5"]


def _cifar100(tmp, *_):
    """CIFAR-100 python layout, tiny protocol; session_1.txt lists the wrong classes on purpose
    (CEC reads the base classes from the labels, never from that file)."""
    root = tmp / "cifar"
    rng = np.random.default_rng(0)
    ytr, yte = np.repeat(np.arange(8), 6), np.repeat(np.arange(8), 2)
    for split, y in (("train", ytr), ("test", yte)):
        touch(str(root / "cifar-100-python" / split),
              pickle.dumps({"fine_labels": y.tolist(), "data": rng.integers(0, 255, (len(y), 3 * 32 * 32), dtype=np.uint8)}))
    idx = root / "index_list" / "cifar100"
    touch(str(idx / "session_1.txt"), "\n".join(str(i) for i in np.flatnonzero(ytr >= 4)).encode())
    for k, classes in ((2, (4, 5)), (3, (6, 7))):
        rows = [int(np.flatnonzero(ytr == c)[j]) for c in classes for j in range(2)]
        touch(str(idx / f"session_{k}.txt"), "\n".join(map(str, rows)).encode())
    return [*FSCIL, "data=cifar100", f"data.root={root}", "method.backbone.name=resnet20", "method.backbone.width=4"]


def _jpg(path, seed):
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(b, "JPEG")
    touch(str(path), b.getvalue())


def _mini_imagenet(tmp, *_):
    root = tmp / "mini"
    wnids = [f"n0{1000000 + 7 * c}" for c in range(8)]
    rows = {"train": [], "test": []}
    for c, w in enumerate(wnids):
        for split, n in (("train", 6), ("test", 2)):
            for j in range(n):
                f = f"{w}{split}{j:04d}.jpg"
                _jpg(root / "miniimagenet" / "images" / f, 100 * c + j)
                rows[split].append(f"{f},{w}")
    idx = root / "index_list" / "mini_imagenet"
    for split in ("train", "test"):
        touch(str(idx / f"{split}.csv"), ("filename,label\n" + "\n".join(rows[split])).encode())
    sess = {1: range(4), 2: (4, 5), 3: (6, 7)}
    for k, classes in sess.items():
        per = 6 if k == 1 else 2
        lines = [f"MINI-ImageNet/train/{wnids[c]}/{wnids[c]}train{j:04d}.jpg" for c in classes for j in range(per)]
        touch(str(idx / f"session_{k}.txt"), "\n".join(lines).encode())
    return [*FSCIL, "data=mini_imagenet", f"data.root={root}", "method.backbone.name=resnet12", "method.backbone.width=8"]


def _cub200(tmp, *_):
    """CUB layout, tiny protocol, an 'ImageNet-pretrained' ResNet-18 (random init, saved here as
    safetensors with its 1000-class classifier) loaded strictly into the FSCIL backbone."""
    import timm
    from safetensors.torch import save_file

    root = tmp / "cub"
    base = root / "CUB_200_2011"
    classes = [f"{c + 1:03d}.Bird_{c}" for c in range(8)]
    ims, tt, cl, sess = [], [], [], {1: [], 2: [], 3: []}
    i = 0
    for c, name in enumerate(classes):
        for j in range(8):
            i += 1
            rel = f"{name}/{name}_{j:04d}.jpg"
            _jpg(base / "images" / rel, i)
            is_train = int(j < 6)
            ims.append(f"{i} {rel}")
            tt.append(f"{i} {is_train}")
            cl.append(f"{i} {c + 1}")
            if is_train:
                k = 1 if c < 4 else 2 if c < 6 else 3
                if k == 1 or j < 2:
                    sess[k].append(f"CUB_200_2011/images/{rel}")
    for name, lines in (("images.txt", ims), ("train_test_split.txt", tt), ("image_class_labels.txt", cl)):
        touch(str(base / name), "\n".join(lines).encode())
    for k, lines in sess.items():
        touch(str(root / "index_list" / "cub200" / f"session_{k}.txt"), "\n".join(lines).encode())
    w = tmp / "resnet18_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=1000).state_dict().items()}, str(w))
    return [*FSCIL, "data=cub200", f"data.root={root}", "method.backbone.name=resnet18", f"method.backbone.weights={w}"]


def _genimage(tmp, *_):
    root = tmp / "genimage"
    genimage_tree(str(root), per=6)
    return ["method=f2c", *ci_overrides("f2c"), "data=genimage", f"data.root={root}", "data.adapter.val_fraction=0.3",
            "data.num_decoders=1"]


def _cnnspot_layout(root, n=6):
    k = 0
    for split, sets in (("train", ("car", "cat")), ("val", ("car",)), ("test", ("biggan", "crn"))):
        for s in sets:
            for f in ("0_real", "1_fake"):
                for j in range(n if split == "train" else 3):
                    k += 1
                    touch(os.path.join(root, split, s, f, f"{j:03d}.png"), png(k))


def _cnnspot(tmp, *_):
    root = tmp / "cnnspot"
    _cnnspot_layout(str(root))
    return ["method=whitening", *ci_overrides("whitening"), "data=cnnspot", f"data.root={root}", "data.num_decoders=1"]


def _image_manifest(tmp, *_):
    """A manifest without captions plus a captions file joined by file name (ITEM)."""
    root = tmp / "captioned"
    rows, caps = ["uri,label,split"], {}
    words = ("red circle", "blue square", "green triangle", "yellow cross")
    k = 0
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        for j in range(n):
            k += 1
            f = f"{split}_{j:03d}.png"
            touch(str(root / f), png(k, 64))
            rows.append(f"{f},{j % 2},{split}")
            caps[f] = f"a photo of a {words[j % 4]} and a {words[(j + 1) % 4]}"
    touch(str(root / "manifest.csv"), "\n".join(rows).encode())
    touch(str(root / "captions.json"), json.dumps(caps).encode())
    # an open_clip model saved as safetensors: ITEM loads it strictly and trains only its head
    from safetensors.torch import save_file

    from conftest import compose
    from trustlab.methods.item.item import build_clip

    ov = ["method=item", *ci_overrides("item")]
    clip = build_clip(compose(ov)["method"]["clip"])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp / "clip.safetensors"))
    return [*ov, "data=image_manifest", f"data.manifest={root / 'manifest.csv'}", f"data.captions={root / 'captions.json'}",
            "data.num_decoders=1", f"method.clip.pretrained={tmp / 'clip.safetensors'}"]


def _faces_lfw(tmp, *_):
    """LFW as shipped (person folders + a 10-fold pairs.txt) with the real portraits as test identities."""
    from test_deocclusion_faces import lfw_tree

    root = tmp / "lfw"
    lfw_tree(str(root))
    return ["method=deocclusion", *ci_overrides("deocclusion"), "method.ablation.enabled=false", "data=faces", f"data.root={root}",
            "data.val_fraction=0.34"]


DATASETS = {"faces_lfw": _faces_lfw, "ffpp": _ffpp, "celebdf": _celebdf, "dfdc": _dfdc, "cifar100": _cifar100, "mini_imagenet": _mini_imagenet,
            "cub200": _cub200, "genimage": _genimage, "cnnspot": _cnnspot, "image_manifest": _image_manifest}


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_trains_one_epoch_through_the_entry_point(name, ray_head, tmp_path, one_thread):
    import sys

    from conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from run import main

    real, fake = face_mp4s(tmp_path) if name in ("ffpp", "celebdf", "dfdc") else (b"", b"")
    ov = DATASETS[name](tmp_path, real, fake)
    assert main([*ov, "trainer.num_workers=1", "trainer.cpus_per_worker=0.5", f"run.root={tmp_path / 'runs'}",
                 f"run.name={name}"]) == 0
    run = tmp_path / "runs" / name
    metrics = json.load(open(run / "metrics.json"))
    summary = (run / "summary.txt").read_text()
    assert "provenance:" in (run / "config.yaml").read_text()
    if name in ("cifar100", "mini_imagenet", "cub200"):
        assert len(metrics["sessions"]) == 1 + TINY_P["n_sessions"]
    else:
        assert "test" in metrics, sorted(metrics)
    if name == "cub200":
        assert "weights method.backbone.weights:" in summary and "sha256" in summary
    if name == "genimage":  # GenImage's listed corrupt files in the training split: counted and named
        bad = {b["uri"] for b in metrics["data_errors"]["bad_files"]}
        assert bad and all("imagenet_ai_0419_sdv4/train/ai/" in u for u in bad)
        assert len(metrics["test"]["by_generator"]) == 8 and "unreadable file(s) skipped" in summary
    if name == "cnnspot":
        assert metrics["concept_constraint"].startswith("off") and "decorrelation" in metrics
        assert set(metrics["test"]["by_generator"]) == {"biggan", "crn"}
    if name == "image_manifest":
        assert "ablation" in metrics
    if name == "faces_lfw":  # LFW protocol (10 folds) for masked pairs and masked probe vs unmasked gallery
        lfw = metrics["test"]["lfw_pairs"]
        assert len(lfw["masked_probe_unmasked_gallery"]["student_completed"]["folds"]) == 10
        assert "acc_std" in lfw["masked_pairs"]["teacher_masked"] and "masked_probe_unmasked_gallery" in metrics["test"]
