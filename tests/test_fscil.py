"""FSCIL engine: session splits (no class leaks, exactly K shots), PD arithmetic, accuracy over
seen classes, the public-layout adapters on tiny directory trees, the generated set, the
baselines and the table/plot. Plain numpy/PyTorch, no Ray."""
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

from trustlab.methods.fscil import engine, protocol
from trustlab.methods.fscil.protocol import Protocol

SMALL = Protocol(n_base=3, n_sessions=2, ways=2, shots=2)  # 7 classes


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


# ----------------------------------------------------------------------------- protocol / splits
def test_protocol_arithmetic():
    p = protocol.PROTOCOLS["cifar100"]
    assert (p.n_classes, p.n_seen(0), p.n_seen(1), p.n_seen(8)) == (100, 60, 65, 100)
    assert list(p.session_classes(3)) == list(range(70, 75))
    assert protocol.PROTOCOLS["cub200"].n_classes == 200 and protocol.PROTOCOLS["cub200"].n_seen(10) == 200
    np.testing.assert_array_equal(p.class_session([0, 59, 60, 64, 65, 99]), [0, 0, 1, 1, 2, 8])


def _assert_valid_sessions(df, p):
    tr = df[df["split"] == "train"]
    sess_classes = [set(tr.loc[tr["session"] == s, "label"]) for s in range(p.n_sessions + 1)]
    for s, cls in enumerate(sess_classes):
        assert cls == set(p.session_classes(s)), (s, cls)
        for t in range(s):
            assert not cls & sess_classes[t], f"class leak between sessions {t} and {s}"
    # the original classes are disjoint too
    orig = [set(tr.loc[tr["session"] == s, "orig_label"]) for s in range(p.n_sessions + 1)]
    assert sum(len(o) for o in orig) == len(set().union(*orig)) == p.n_classes
    shots = tr[tr["session"] > 0].groupby("label").size()
    assert (shots == p.shots).all() and len(shots) == p.n_sessions * p.ways
    assert not df["image_id"].duplicated().any(), "an image is in two splits"
    # every test row's session is its class's session
    np.testing.assert_array_equal(df["session"], p.class_session(df["label"]))


def test_digits_splits_no_leaks_exact_shots_and_seeded():
    from trustlab.methods.fscil.digits import build_digits, digits_manifest

    p = Protocol(4, 3, 2, 5)
    df = digits_manifest(p, seed=0, test_per_class=50, val_per_class=30, val_novel_per_class=20)
    _assert_valid_sessions(df, p)
    assert (df[df["split"] == "test"].groupby("label").size() == 50).all()
    val = df[df["split"] == "val"].groupby("label").size()
    assert (val.iloc[:4] == 30).all() and (val.iloc[4:] == 20).all()
    assert df.equals(digits_manifest(p, 0, 50, 30, 20))  # deterministic by seed
    other = digits_manifest(p, 1, 50, 30, 20)
    assert not df["image_id"].equals(other["image_id"])
    data = build_digits(p, 0, 50, 30, 20)
    assert data["train"]["x"].shape[1:] == (1, 8, 8) and data["train"]["x"].dtype == np.uint8
    assert len(data["test"]["y"]) == 500 and (protocol.session_split(data["train"], 2)["y"] >= 6).all()
    # arrays carry the manifest's images: the same pixels as scikit-learn's digit of that id
    from sklearn.datasets import load_digits

    raw = load_digits().images
    i = int(data["test"]["vid"][7])
    np.testing.assert_allclose(data["test"]["x"][7, 0] / 255.0 * 16, raw[i], atol=0.04)


def test_digits_occlusion_hides_one_block_in_a_share_of_the_training_images_only():
    """CD²'s planted signal: a seeded share of the training images gets one zeroed block;
    validation and test images stay whole."""
    from trustlab.methods.fscil.digits import build_digits

    p = Protocol(4, 3, 2, 5)
    whole = build_digits(p, 0, 50, 30, 20)
    hid = build_digits(p, 0, 50, 30, 20, occluded={"share": 0.3, "side": 4})
    for split in ("val", "test"):
        np.testing.assert_array_equal(whole[split]["x"], hid[split]["x"])
    a, b = whole["train"]["x"][:, 0], hid["train"]["x"][:, 0]
    changed = (a != b).reshape(len(a), -1).any(1)
    assert 0.2 < changed.mean() <= 0.35, changed.mean()  # a block on blank pixels changes nothing
    for i in np.flatnonzero(changed):
        r, c = np.nonzero(a[i] != b[i])
        assert np.ptp(r) < 4 and np.ptp(c) < 4 and (b[i][r, c] == 0).all()
    np.testing.assert_array_equal(b, build_digits(p, 0, 50, 30, 20, occluded={"share": 0.3, "side": 4})["train"]["x"][:, 0])
    with pytest.raises(ValueError, match="side"):
        build_digits(p, 0, 50, 30, 20, occluded={"share": 0.3, "side": 9})
    with pytest.raises(ValueError, match="share"):
        build_digits(p, 0, 50, 30, 20, occluded={"share": -0.1, "side": 4})


def test_check_manifest_rejects_leaks_and_wrong_shot_counts():
    from trustlab.methods.fscil.digits import digits_manifest

    p = Protocol(4, 3, 2, 5)
    df = digits_manifest(p, 0, 50, 30)
    leak = df.copy()
    leak.loc[(leak["label"] == 5) & (leak["split"] == "train"), "session"] = 2
    with pytest.raises(ValueError, match="leak"):
        protocol.check_manifest(leak, p)
    extra = pd.concat([df, df[(df["label"] == 4) & (df["split"] == "test")].head(1).assign(split="train", uri="x#new")])
    with pytest.raises(ValueError, match="exactly 5"):
        protocol.check_manifest(extra, p)
    dup = pd.concat([df, df[df["split"] == "test"].head(1).assign(split="val")])
    with pytest.raises(ValueError, match="two"):
        protocol.check_manifest(dup, p)


# ----------------------------------------------------------------------------- metrics
def test_pd_average_last_arithmetic():
    r = engine.summarize_sessions([83.32, 70.0, 57.36])
    assert r["pd"] == pytest.approx(83.32 - 57.36) and r["last"] == 57.36 and r["first"] == 83.32
    assert r["average"] == pytest.approx((83.32 + 70.0 + 57.36) / 3)
    assert engine.performance_drop([50.0, 60.0]) == pytest.approx(-10.0)


def test_session_accuracy_counts_only_seen_classes():
    p = Protocol(2, 2, 1, 1)  # 4 classes
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    test = {"x": np.zeros((8, 1, 2, 2), np.uint8), "y": y}
    # a model that always says class 1 (among the seen ones): 1/2 of base rows, then 2/6, 2/8
    accs = engine.session_accuracies(lambda x, s: torch.tensor([[0.0, 1.0, 0.5, 0.5]]).expand(len(x), 4), test, p)
    assert accs == pytest.approx([50.0, 100 * 2 / 6, 25.0])
    # scores for unseen classes are ignored even if they are the largest
    accs = engine.session_accuracies(lambda x, s: torch.tensor([[1.0, 0.0, 0.0, 9.0]]).expand(len(x), 4), test, p)
    assert accs[0] == pytest.approx(50.0) and accs[2] == pytest.approx(25.0)


# ----------------------------------------------------------------------------- tiny public layouts
def _color(orig: int) -> int:
    return 10 + 7 * orig  # each original class has its own grey level, to check the decoding


def _cifar_tree(root, n_classes=7, per_train=4, per_test=2):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    for split, n in (("train", per_train), ("test", per_test)):
        ys = [c for c in range(n_classes) for _ in range(n)]
        data = np.stack([np.full(3 * 32 * 32, _color(c), np.uint8) for c in ys])
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump({"data": data, "fine_labels": ys}, f)
    idx = os.path.join(root, "index_list", "cifar100")
    os.makedirs(idx)
    ys = np.array([c for c in range(n_classes) for _ in range(per_train)])
    lists = [np.flatnonzero(ys < 3), np.concatenate([np.flatnonzero(ys == c)[:2] for c in (3, 4)]),
             np.concatenate([np.flatnonzero(ys == c)[1:3] for c in (5, 6)])]
    for k, lst in enumerate(lists, start=1):
        with open(os.path.join(idx, f"session_{k}.txt"), "w") as f:
            f.write("\n".join(str(i) for i in lst) + "\n")
    return idx


def test_cifar100_adapter_on_tiny_tree(tmp_path):
    _cifar_tree(str(tmp_path))
    df = protocol.cifar100_manifest(str(tmp_path), p=SMALL, val_per_class=1, seed=0)
    _assert_valid_sessions(df, SMALL)
    assert (df.groupby("split").size().to_dict()) == {"train": 3 * 3 + 8, "val": 3, "test": 14}
    assert df.loc[df["label"] == 5, "orig_label"].unique().tolist() == [5]
    data = protocol.load_manifest(df, size=16, channels=3)
    assert data["train"]["x"].shape[1:] == (3, 16, 16)
    for split in data.values():  # pixels say which original class each row is
        np.testing.assert_array_equal(split["x"][:, 0, 0, 0], [_color(c) for c in split["y"]])
    path = protocol.write_manifest(df, str(tmp_path / "m.parquet"))
    assert protocol.read_manifest(path).equals(df)
    # a session that re-uses a base class is rejected
    with open(tmp_path / "index_list" / "cifar100" / "session_3.txt", "a") as f:
        f.write("0\n")
    with pytest.raises(ValueError):
        protocol.cifar100_manifest(str(tmp_path), p=SMALL)


def test_cifar100_adapter_base_from_labels_without_base_list(tmp_path):
    idx = _cifar_tree(str(tmp_path))
    os.remove(os.path.join(idx, "session_1.txt"))
    os.rename(os.path.join(idx, "session_2.txt"), os.path.join(idx, "session_1.txt"))
    os.rename(os.path.join(idx, "session_3.txt"), os.path.join(idx, "session_2.txt"))
    df = protocol.cifar100_manifest(str(tmp_path), p=SMALL)
    _assert_valid_sessions(df, SMALL)
    assert (df[(df["split"] == "train") & (df["session"] == 0)].groupby("label").size() == 4).all()


def _jpg(path, orig):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), _color(orig), np.uint8)).save(path, quality=95)


def test_mini_imagenet_adapter_on_tiny_tree(tmp_path):
    root = str(tmp_path)
    wnids = [f"n0{1000 + 37 * c}" for c in (4, 1, 6, 0, 3, 5, 2)]  # class id = first appearance in train.csv
    rows = {"train": [], "test": []}
    for c, w in enumerate(wnids):
        for split, n in (("train", 3), ("test", 2)):
            for i in range(n):
                name = f"{w}{split}{i:04d}.jpg"
                _jpg(os.path.join(root, "miniimagenet", "images", name), c)
                rows[split].append((name, w))
    os.makedirs(os.path.join(root, "miniimagenet", "split"))
    for split, r in rows.items():
        pd.DataFrame(r, columns=["filename", "label"]).to_csv(os.path.join(root, "miniimagenet", "split", f"{split}.csv"), index=False)
    idx = os.path.join(root, "index_list", "mini_imagenet")
    os.makedirs(idx)
    tr = rows["train"]
    sess = [[n for n, w in tr if wnids.index(w) < 3],
            [n for n, w in tr if wnids.index(w) in (3, 4) and not n.endswith("0002.jpg")],
            [n for n, w in tr if wnids.index(w) in (5, 6) and not n.endswith("0000.jpg")]]
    for k, names in enumerate(sess, start=1):
        with open(os.path.join(idx, f"session_{k}.txt"), "w") as f:
            f.write("\n".join(f"MINI-ImageNet/train/{n[:6]}/{n}" for n in names) + "\n")
    df = protocol.mini_imagenet_manifest(root, p=SMALL)
    _assert_valid_sessions(df, SMALL)
    assert len(df[df["split"] == "test"]) == 14
    data = protocol.load_manifest(df, size=8, channels=3)
    for split in data.values():
        np.testing.assert_allclose(split["x"][:, 0, 4, 4], [_color(c) for c in split["y"]], atol=3)


def test_cub200_adapter_on_tiny_tree(tmp_path):
    root = str(tmp_path)
    base = os.path.join(root, "CUB_200_2011")
    ims, tt, cl = [], [], []
    iid = 0
    for c in range(7):
        folder = f"{c + 1:03d}.Bird_{c}"
        for i in range(5):
            iid += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            _jpg(os.path.join(base, "images", rel), c)
            ims.append(f"{iid} {rel}")
            tt.append(f"{iid} {1 if i < 3 else 0}")
            cl.append(f"{iid} {c + 1}")
    for name, lines in (("images.txt", ims), ("train_test_split.txt", tt), ("image_class_labels.txt", cl)):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    idx = os.path.join(root, "index_list", "cub200")
    os.makedirs(idx)
    train = [ln.split()[1] for ln, t in zip(ims, tt) if t.endswith(" 1")]
    by_c = {c: [r for r in train if r.startswith(f"{c + 1:03d}.")] for c in range(7)}
    sess = [by_c[0] + by_c[1] + by_c[2], by_c[3][:2] + by_c[4][1:], by_c[5][:2] + by_c[6][:2]]
    for k, rels in enumerate(sess, start=1):
        with open(os.path.join(idx, f"session_{k}.txt"), "w") as f:
            f.write("\n".join(f"CUB_200_2011/images/{r}" for r in rels) + "\n")
    df = protocol.cub200_manifest(root, p=SMALL, val_per_class=1, seed=3)
    _assert_valid_sessions(df, SMALL)
    assert len(df[df["split"] == "test"]) == 14 and len(df[df["split"] == "val"]) == 3
    data = protocol.load_manifest(df, size=8, channels=1)
    assert data["test"]["x"].shape[1:] == (1, 8, 8)
    for split in data.values():
        np.testing.assert_allclose(split["x"][:, 0, 4, 4], [_color(c) for c in split["y"]], atol=3)


def test_generated_set_is_cifar_layout_and_seeded(tmp_path):
    from trustlab.methods.fscil.synth_classes import build_tree

    root = build_tree(str(tmp_path), 0, SMALL, train_per_class=6, test_per_class=3)
    assert build_tree(str(tmp_path), 0, SMALL, 6, 3) == root  # cached
    df = protocol.cifar100_manifest(root, p=SMALL, val_per_class=2, seed=0, source="synth")
    _assert_valid_sessions(df, SMALL)
    data = protocol.load_manifest(df, size=16, channels=3)
    x = data["test"]["x"].astype(float)
    # instances of one class look more alike than instances of different classes
    y = data["test"]["y"]
    flat = x.reshape(len(x), -1)
    d = ((flat[:, None] - flat[None]) ** 2).mean(-1)
    same = d[(y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)].mean()
    diff = d[y[:, None] != y[None]].mean()
    assert same < 0.8 * diff, (same, diff)
    root2 = build_tree(str(tmp_path / "again"), 0, SMALL, 6, 3)
    a = open(os.path.join(root, "cifar-100-python", "test"), "rb").read()
    assert a == open(os.path.join(root2, "cifar-100-python", "test"), "rb").read()


# ----------------------------------------------------------------------------- baselines, table, plot
def _toy_data(p, n_per=12, seed=0):
    """Gaussian clusters in 8-d input space, one per class; x stored as float (already 'images')."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(p.n_classes, 8))
    out = {}
    for split, n in (("train", n_per), ("test", n_per)):
        xs, ys = [], []
        for c in range(p.n_classes):
            k = n if (split == "test" or c < p.n_base) else p.shots
            xs.append(centers[c] + rng.normal(0, 0.3, (k, 8)))
            ys += [c] * k
        y = np.array(ys)
        out[split] = {"x": np.concatenate(xs).astype(np.float32), "y": y, "session": p.class_session(y)}
    return out


def test_baselines_prototypes_remember_finetune_forgets():
    p = Protocol(4, 2, 2, 5)
    data = _toy_data(p)
    enc = nn.Identity()
    clf = nn.Linear(8, p.n_base)
    proto = engine.prototype_baseline(enc, data, p)
    assert min(proto) > 95.0  # separable clusters: nearest class mean is right
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    x, y = torch.as_tensor(data["train"]["x"][data["train"]["y"] < 4]), torch.as_tensor(data["train"]["y"][data["train"]["y"] < 4])
    clf = nn.Linear(16, p.n_base)
    opt = torch.optim.Adam(list(enc.parameters()) + list(clf.parameters()), 0.01)
    for _ in range(200):
        loss = nn.functional.cross_entropy(clf(enc(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ft = engine.finetune_baseline(enc, clf, data, p, steps=100, lr=0.01)
    assert ft[0] > 95.0 and ft[-1] < 60.0, ft  # trained on new classes only: the old ones are lost
    assert engine.prototype_baseline(enc, data, p)[-1] > ft[-1] + 20


def test_table_and_plot(tmp_path):
    res = {"m": engine.summarize_sessions([90, 80, 70]), "finetune": engine.summarize_sessions([90, 40, 20])}
    t = engine.session_table(res)
    assert list(t.columns) == ["method", "s0", "s1", "s2", "average", "pd", "last"]
    assert t.loc[t["method"] == "finetune", "pd"].item() == 70
    png = engine.session_plot(res, str(tmp_path / "s.png"))
    assert os.path.getsize(png) > 1000
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(dict(res["m"], method="m", baselines={"finetune": res["finetune"]})))
    assert set(engine.runs_results([str(run)])) == {"m", "finetune"}


def test_random_shift_moves_content_without_loss():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    y = engine.random_shift(x, 1, torch.Generator().manual_seed(0))
    assert torch.equal(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    assert (y != x).any(dim=(1, 2, 3)).float().mean() > 0.6
    assert torch.equal(engine.random_shift(x, 0), x)


@pytest.mark.parametrize("name", ["cd2", "sdc"])
def test_method_yaml_tune_space_is_valid(name):
    from conftest import compose
    from trustlab.platform.tune import validate_space

    cfg = compose([f"method={name}"])
    validate_space(cfg["method"]["tune"]["space"], cfg)
    assert cfg["method"]["tune"]["metric"] == "val_score"


def test_recompute_batchnorm_sets_the_running_statistics_to_the_training_images():
    """``method.base.precise_bn``: the running statistics the base model is validated and saved
    with are those of the training images, whatever the running averages had drifted to."""
    import copy

    from conftest import compose
    from trustlab.platform.registry import get_method
    from trustlab.platform.train import WorkerContext

    m = get_method("cd2")
    cfg = compose(["method=cd2"])
    data = m.build_data(cfg)
    sd = m.stage_data(cfg, "base", data)
    torch.manual_seed(0)
    model = m.build_model(cfg, "base")
    bns = [b for b in model.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    assert bns, "the default backbone has BatchNorm layers"
    first = bns[0]
    seen = []
    probe = copy.deepcopy(model).eval()
    probe_bn = [b for b in probe.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)][0]
    probe_bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        m.session_logits(probe, engine.as_float(sd["train"]["x"]), 0)
    want = seen[0].mean((0, 2, 3))
    for b in bns:  # statistics far from any data's
        b.running_mean.fill_(5.0)
        b.running_var.fill_(100.0)
    ctx = WorkerContext.local(cfg, "base", sd)
    model.eval()  # as validation calls it
    assert engine.recompute_batchnorm(m, model, ctx) == len(bns)
    assert torch.allclose(first.running_mean, want, atol=0.02 * float(want.abs().max()) + 1e-4), (first.running_mean, want)
    assert float(first.running_var.max()) < 50 and all(b.momentum == 0.1 for b in bns)
    assert not model.training  # left in the mode it was in
