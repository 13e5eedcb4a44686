"""The one weights loader (trustlab.platform.weights): safetensors and torch files, local, s3://
and timm tags; prefix stripping; strict loads that list what is missing; ViT position-embedding
resampling; every tensor of a timm ViT, a timm ResNet and an open_clip model matched into the
methods that use them; the run records the weights it started from."""
import os

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from conftest import ci_overrides, compose
from trustlab.platform import weights as W
from trustlab.platform.registry import get_method


def _save(sd: dict, path) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def _same(sd_a: dict, sd_b: dict, prefix: str = "") -> None:
    """Every tensor of ``sd_a`` equals the tensor of ``sd_b`` under ``prefix``."""
    for k, v in sd_a.items():
        assert torch.equal(v, sd_b[prefix + k]), k


def test_timm_resnet_safetensors_every_tensor_into_f2c_whitening_and_frame_cnn(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=1)
    path = _save(src.state_dict(), tmp_path / "resnet10t.safetensors")
    for method, attr, extra in (("f2c", "backbone", []), ("whitening", "cnn", [])):
        cfg = compose([f"method={method}", f"method.weights={path}", *extra])
        torch.manual_seed(1)  # another init: only a load makes the tensors equal
        model = get_method(method).build_model(cfg, "train")
        _same(src.state_dict(), getattr(model, attr).state_dict())
    # the per-frame CNN of NACO/LAST (features only: the classifier is left out, nothing missing)
    from trustlab.methods.video.common import FrameTokens

    ft = FrameTokens("resnet10t", 3, 16, path, compose(["method=naco"]))
    feat = ft.cnn.state_dict()
    _same({k: v for k, v in src.state_dict().items() if k in feat}, feat)


def test_timm_vit_into_stdt_and_open_clip_into_item(tmp_path):
    import timm

    cfg = compose(["method=stdt", *ci_overrides("stdt")])
    m = cfg["method"]
    torch.manual_seed(0)
    vit = timm.create_model(m["backbone"], pretrained=False, num_classes=1, img_size=int(m["data"]["size"]),
                            patch_size=int(m["patch_size"]), **{k: v for k, v in m["vit"].items() if v is not None})
    path = _save(vit.state_dict(), tmp_path / "vit.safetensors")
    cfg = compose(["method=stdt", *ci_overrides("stdt"), f"method.weights={path}"])
    torch.manual_seed(1)
    _same(vit.state_dict(), get_method("stdt").build_model(cfg, "train").vit.state_dict())

    from trustlab.methods.item.item import build_clip

    icfg = compose(["method=item", *ci_overrides("item")])
    torch.manual_seed(0)
    clip = build_clip(icfg["method"]["clip"])
    cpath = _save(clip.state_dict(), tmp_path / "clip.safetensors")
    icfg = compose(["method=item", *ci_overrides("item"), f"method.clip.pretrained={cpath}"])
    torch.manual_seed(1)
    net = get_method("item").build_model(icfg, "head")
    _same(clip.state_dict(), net.clip.state_dict())


def test_mismatched_keys_fail_with_the_list(tmp_path):
    import timm

    other = timm.create_model("resnet18", pretrained=False)
    path = _save(other.state_dict(), tmp_path / "resnet18.safetensors")
    cfg = compose(["method=f2c", f"method.weights={path}"])
    with pytest.raises(W.WeightsError) as e:
        get_method("f2c").build_model(cfg, "train")
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "conv1.0.weight" in msg
    assert "shape differs" in msg and "tensors matched" in msg
    # a partial load passes only above weights.min_share
    with pytest.raises(W.WeightsError, match="need >= 90%"):
        W.create_timm("resnet10t", path, {"weights": {"strict": False, "min_share": 0.9}})
    rep_model = W.create_timm("resnet10t", path, {"weights": {"strict": False, "min_share": 0.5}})
    assert rep_model is not None
    with pytest.raises(FileNotFoundError):
        W.create_timm("resnet10t", str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.", "model.module."])
def test_prefixes_are_stripped_and_containers_unwrapped(tmp_path, prefix):
    import timm

    src = timm.create_model("resnet10t", pretrained=False, num_classes=1)
    path = _save({"state_dict": {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "w.pth")
    dst = timm.create_model("resnet10t", pretrained=False, num_classes=1)
    rep = W.load_into(dst, path)
    assert rep.share == 1.0 and not rep.missing and set(rep.stripped) <= {"module.", "model.", "backbone."}
    _same(src.state_dict(), dst.state_dict())


def test_imagenet_classifier_reinitialised_and_vit_pos_embed_resampled(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=1000,
                            embed_dim=32, depth=1, num_heads=2)
    path = _save(vit.state_dict(), tmp_path / "vit.safetensors")
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=1,
                              embed_dim=32, depth=1, num_heads=2)
    rep = W.load_into(small, path, classifier="head")
    assert rep.reinitialised == ["head.weight", "head.bias"]
    assert any(r.startswith("pos_embed") for r in rep.resampled)
    assert small.pos_embed.shape == (1, 1 + 4, 32)


def test_s3_and_timm_tag_sources_and_provenance(tmp_path):
    import timm

    from trustlab.platform.data.s3local import LocalS3, upload_file

    src = timm.create_model("resnet10t", pretrained=False, num_classes=1)
    path = _save(src.state_dict(), tmp_path / "model.safetensors")
    tdir = tmp_path / "timm" / "resnet10t.c3_in1k"
    tdir.mkdir(parents=True)
    _save(src.state_dict(), tdir / "model.safetensors")
    base = {"weights": {"timm_dir": str(tmp_path / "timm"), "cache": str(tmp_path / "cache")}}
    m = W.create_timm("resnet10t.c3_in1k", "timm:resnet10t.c3_in1k", base, num_classes=1)
    _same(src.state_dict(), m.state_dict())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        W.local_file("timm:resnet18.a1_in1k", base)
    with LocalS3() as s3:
        s3.create_bucket("weights")
        uri = upload_file(s3.endpoint, path, "weights", "f2c/model.safetensors")
        cfg = dict(base, run={"s3_endpoint": s3.endpoint}, method={"name": "f2c", "weights": uri})
        local = W.local_file(uri, cfg)
        assert local.startswith(str(tmp_path / "cache"))
        prov = W.provenance(cfg)
    assert prov == [{"key": "method.weights", "source": uri, "file": local, "sha256": W.sha256(path),
                     "bytes": os.path.getsize(path)}]
    assert "sha256 " + W.sha256(path) in W.provenance_lines(prov)[0]


def test_relabel_explains_a_timm_classifier_with_its_own_preprocessing(tmp_path):
    """A multi-class timm classifier (random init, saved as safetensors) as re-label distillation's
    black box: every tensor loaded, its own input size / mean / std applied, explanations computed."""
    import timm

    from trustlab.methods.relabel import relabel as R

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    path = _save(src.state_dict(), tmp_path / "classifier.safetensors")
    cfg = compose(["method=relabel", *ci_overrides("relabel"), "method.blackbox.timm=resnet10t",
                   f"method.blackbox.weights={path}", "method.blackbox.num_classes=7", "method.data.size=32",
                   "method.relabel.cell=4", "method.relabel.n_samples=32"])
    m = get_method("relabel")
    assert m.stages(cfg) == ["vae", "relabel"]  # the classifier is given: no black-box stage
    model = m.build_model(cfg, "vae")
    bb = model.blackbox
    assert isinstance(bb, R.TimmBlackBox) and bb.n_classes == 7
    _same(src.state_dict(), bb.net.state_dict())
    assert bb.input_size == tuple(src.pretrained_cfg["input_size"][1:])  # its own preprocessing
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = torch.softmax(src.eval()((torch.nn.functional.interpolate(x, size=bb.input_size, mode="bicubic",
                                                                          align_corners=False).clamp(0, 1) - bb.mean) / bb.std), 1)
        assert torch.allclose(model.probs(x), ref, atol=1e-5)
    out = R.explain(model, x, cfg["method"]["relabel"], seed=np.arange(2))
    assert out["weights"].shape[0] == 2 and torch.isfinite(out["contribution"]).all()


def test_naco_transformer_weights_load_into_naco_and_last(tmp_path):
    """NACO/LAST Transformer weights (not only their CNN): a NACO model.pt's Transformer loads
    strictly into another NACO and, through the backbone. prefix, into LAST of the same width."""
    torch.manual_seed(0)
    naco_cfg = compose(["method=naco", *ci_overrides("naco"), "method.dim=128"])
    src = get_method("naco").build_model(naco_cfg, "pretrain_ssl")
    path = tmp_path / "naco.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)
    parts = ("blocks.", "norm.", "pos", "frame_embed", "mask_token")
    want = {k: v for k, v in src.state_dict().items() if k.startswith(parts)}
    torch.manual_seed(1)
    naco = get_method("naco").build_model(compose(["method=naco", *ci_overrides("naco"), "method.dim=128",
                                                   f"method.transformer_weights={path}"]), "pretrain_ssl")
    _same(want, naco.state_dict())
    torch.manual_seed(2)
    last = get_method("last").build_model(compose(["method=last", *ci_overrides("last"), "method.dim=128",
                                                   f"method.transformer_weights={path}"]), "pretrain_ssl")
    _same(want, last.state_dict(), prefix="backbone.")
    assert not torch.equal(src.state_dict()["head.0.weight"], naco.state_dict()["head.0.weight"])  # only the Transformer


def test_relative_weights_paths_are_made_absolute_before_the_workers_see_them(tmp_path, monkeypatch):
    """Ray Train and Tune workers run in their trial folders, so a weights path given relative to
    where ``experiments/run.py`` was started named nothing there (a re-label run on
    ``method.blackbox.checkpoint=outputs/<f2c run>/checkpoints/best.pt`` failed in its workers with
    FileNotFoundError). The run folder's preparation makes local sources absolute; URIs and tags stay."""
    from trustlab.platform.experiment import prepare_run_dir

    w = tmp_path / "bb" / "model.pt"
    w.parent.mkdir()
    torch.save({"a": torch.zeros(2)}, w)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["method=relabel", "method.blackbox.checkpoint=bb", "weights.cache=wcache",
                   f"run.root={tmp_path / 'runs'}", "run.name=rel"])
    _, run_dir = prepare_run_dir(cfg)
    assert cfg["method"]["blackbox"]["checkpoint"] == str(tmp_path / "bb")
    assert cfg["weights"]["cache"] == str(tmp_path / "wcache")
    assert f"checkpoint: {tmp_path / 'bb'}" in open(os.path.join(run_dir, "config.yaml")).read()
    elsewhere = tmp_path / "trial"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where a worker runs
    assert W.local_file(cfg["method"]["blackbox"]["checkpoint"], cfg) == str(w)
    kept = {"method": {"weights": "s3://bucket/w.safetensors", "vae": {"checkpoint": "timm:resnet10t.c3_in1k"}},
            "weights": {"timm_dir": "s3://bucket/timm"}}
    assert W.absolute_paths(kept) == {"method": {"weights": "s3://bucket/w.safetensors",
                                                 "vae": {"checkpoint": "timm:resnet10t.c3_in1k"}},
                                      "weights": {"timm_dir": "s3://bucket/timm"}}
