"""De-occlusion on real faces (data=faces): LFW as shipped (folders + pairs.txt, 10 folds), a face
manifest, masks synthesised on the real portraits, masked-probe-vs-unmasked-gallery verification."""
import os

import numpy as np
import pytest
import torch

from conftest import REPO, compose

REAL = os.path.join(os.path.dirname(REPO), "shared", "data", "real", "faces")
pytestmark = pytest.mark.skipif(not os.path.isdir(REAL), reason="real test portraits not present")


def lfw_tree(root: str, n_train_ids: int = 6, per: int = 4, folds: int = 10) -> list[str]:
    """An LFW-shaped tree: 250 px frames, the four real portraits as the test identities (``per``
    variants each, named in a ``folds``-fold pairs.txt), synthetic identities to train on."""
    from PIL import Image, ImageEnhance

    from trustlab.methods.deocclusion.synth_identities import make_split

    def frame(face: Image.Image) -> Image.Image:
        canvas = Image.new("RGB", (250, 250), (90, 90, 90))
        canvas.paste(face.resize((115, 133)), (67, 67))
        return canvas

    names = []
    for k, f in enumerate(sorted(f for f in os.listdir(REAL) if f.endswith("_aligned.png"))):
        name = "_".join(w.capitalize() for w in f[: -len("_aligned.png")].split("_"))
        names.append(name)
        im = Image.open(os.path.join(REAL, f)).convert("RGB")
        for j in range(per):
            v = im.transpose(Image.FLIP_LEFT_RIGHT) if j % 2 else im
            v = ImageEnhance.Brightness(v).enhance(0.85 + 0.1 * j)
            os.makedirs(os.path.join(root, name), exist_ok=True)
            frame(v).save(os.path.join(root, name, f"{name}_{j + 1:04d}.jpg"))
    synth = make_split(0, 0, n_train_ids, per, 64, 0)
    for i, (x, y) in enumerate(zip(synth["x"], synth["y"])):
        name = f"Synthetic_Person{int(y):02d}"
        os.makedirs(os.path.join(root, name), exist_ok=True)
        frame(Image.fromarray(x.transpose(1, 2, 0))).save(os.path.join(root, name, f"{name}_{i % per + 1:04d}.jpg"))
    lines = [f"{folds}\t1"]
    for k in range(folds):
        a, b = names[k % len(names)], names[(k + 1) % len(names)]
        lines.append(f"{a}\t{1 + k % per}\t{1 + (k + 1) % per}")
        lines.append(f"{a}\t{1 + k % per}\t{b}\t{1 + (k + 2) % per}")
    with open(os.path.join(root, "pairs.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return names


def test_lfw_layout_pairs_and_splits(tmp_path):
    from trustlab.methods.deocclusion import real_faces as RF

    names = lfw_tree(str(tmp_path))
    cfg = compose(["method=deocclusion", "data=faces", f"data.root={tmp_path}", "data.val_fraction=0.34"])
    df, plist = RF.face_manifest(cfg)
    assert len(plist) == 20 and sum(p[4] for p in plist) == 10 and sorted({p[5] for p in plist}) == list(range(10))
    assert set(df.loc[df["split"] == "test", "identity"]) == set(names)  # identities named in pairs.txt
    assert set(df.loc[df["split"] == "val", "identity"]) and not set(df.loc[df["split"] == "val", "identity"]) & set(names)
    data = RF.face_data(cfg)
    te, p = data["test"], data["pairs"]
    assert te["x"].shape[1:] == (3, 32, 32) and te["lm"].shape[1:] == (8, 2)
    assert (te["y"][p["a"]] == te["y"][p["b"]]).astype(int).tolist() == p["same"].tolist()
    with open(tmp_path / "pairs.txt", "a") as f:
        f.write("Nobody\t1\t2\n")
    with pytest.raises(ValueError, match="header says 10 folds"):
        RF.read_pairs(str(tmp_path / "pairs.txt"))


def test_masks_on_real_faces_from_the_template_cover_the_lower_face():
    from PIL import Image

    from trustlab.methods.deocclusion import masks as masklib
    from trustlab.methods.deocclusion.real_faces import TEMPLATES

    f = sorted(x for x in os.listdir(REAL) if x.endswith("_aligned.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(REAL, n)).convert("RGB").resize((64, 64))).copy())
                     .permute(2, 0, 1).float() / 255 for n in f])
    lm = torch.tensor(TEMPLATES["aligned"]).float()[None].repeat(len(x), 1, 1) * 64
    xm, m, _ = masklib.synthesize(x, lm, np.arange(len(x)), {}, per_item=True)
    # the nose-to-mouth band is covered, the eye band is not
    assert float(m[:, 0, 42:50, 24:40].mean()) > 0.9 and float(m[:, 0, 24:30, :].sum()) == 0
    assert float((xm - x).abs()[:, :, 46:50, 24:40].mean()) > 0.02


def test_ten_fold_accuracy_and_probe_gallery_metrics():
    from trustlab.methods.deocclusion.deocclusion import verification_metrics
    from trustlab.methods.deocclusion.real_faces import fold_accuracy

    same = np.tile([1, 0], 50)
    fold = np.repeat(np.arange(10), 10)
    sim = np.where(same == 1, 0.8, 0.2) + np.random.default_rng(0).normal(0, 0.01, 100)
    r = fold_accuracy(sim, same, fold)
    assert r["acc_mean"] == 1.0 and r["acc_std"] == 0.0 and len(r["folds"]) == 10
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    y = np.repeat(np.arange(5), 4)
    clean = centres[y] + 0.05 * rng.normal(size=(20, 16))
    masked = clean + 0.8 * rng.normal(size=(20, 16))
    vs_clean = verification_metrics(masked, y, gallery=clean)
    vs_masked = verification_metrics(masked, y)
    assert vs_clean["auc"] > vs_masked["auc"]  # an unmasked gallery helps a noisy probe


def test_any_face_set_by_manifest_with_or_without_landmarks(tmp_path):
    import pandas as pd

    from trustlab.methods.deocclusion import real_faces as RF

    lfw_tree(str(tmp_path / "faces"), n_train_ids=3, per=2)
    rows = []
    for d in sorted(os.listdir(tmp_path / "faces")):
        if os.path.isdir(tmp_path / "faces" / d):
            for f in sorted(os.listdir(tmp_path / "faces" / d)):
                split = "test" if not d.startswith("Synthetic") else "train"
                rows.append({"uri": f"faces/{d}/{f}", "identity": d, "split": split})
    df = pd.DataFrame(rows)
    lm = np.tile(np.asarray(RF.TEMPLATES["aligned"]) * 250, (len(df), 1, 1)).reshape(len(df), -1)
    df[RF.LM_COLUMNS] = lm
    df.loc[0, RF.LM_COLUMNS] = np.nan  # this one takes the template
    df.to_csv(tmp_path / "manifest.csv", index=False)
    cfg = compose(["method=deocclusion", "data=faces", f"data.manifest={tmp_path / 'manifest.csv'}"])
    data = RF.face_data(cfg)
    assert set(data) == {"train", "val", "test"}  # val identities carved from train (none in the manifest)
    assert len(np.unique(data["train"]["y"])) + len(np.unique(data["val"]["y"])) == 3
    # landmarks given in pixels of the 250 px image land where the template puts them at 32 px
    assert np.allclose(data["test"]["lm"], np.asarray(RF.TEMPLATES["aligned"]) * 32, atol=1e-3)
    assert RF.face_manifest(cfg)[1] is None  # no pairs.txt: verification over the test identities' pairs
