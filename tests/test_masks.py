"""Online mask synthesis: placement by face geometry (synthetic faces and real photos),
equivariance to the face's position / rotation / scale, seeding, variety (plain PyTorch)."""
import os

import numpy as np
import pytest
import torch

from trustlab.methods.deocclusion import masks
from trustlab.methods.deocclusion.synth_identities import make_split

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors: one intra-op thread


REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "real", "faces")

# Landmarks of the four 160x160 aligned crops in ../shared/data/real/faces, annotated by eye from
# the images (order masks.LANDMARKS: eyes, nose tip, mouth corners, chin, jaw edge at mouth height).
HAND = {
    "angelina_jolie": [(62, 65), (135, 65), (100, 98), (72, 123), (122, 123), (97, 157), (28, 120), (158, 120)],
    "kate_siegel": [(40, 65), (117, 67), (73, 97), (40, 123), (108, 123), (77, 158), (5, 120), (150, 120)],
    "paul_rudd": [(43, 70), (115, 70), (78, 103), (50, 127), (110, 127), (80, 157), (10, 125), (150, 125)],
    "shea_whigham": [(43, 68), (122, 70), (77, 103), (47, 125), (113, 123), (80, 157), (5, 122), (155, 122)],
}


def _params(n, shape, texture="solid", seed=0):
    p = masks.sample_params(n, seed)
    p["shape"] = np.full(n, masks.SHAPES.index(shape))
    p["texture"] = np.full(n, masks.TEXTURES.index(texture))
    return p


def _at(m, pts):
    """mask values (B x K) at landmark points (B x K x 2, pixel coords)."""
    b = torch.arange(m.shape[0])[:, None].expand(-1, pts.shape[1])
    xy = pts.round().long()
    return m[b, 0, xy[..., 1].clamp(0, m.shape[2] - 1), xy[..., 0].clamp(0, m.shape[3] - 1)]


@pytest.fixture(scope="module")
def synth():
    d = make_split(seed=3, split_id=0, n_ids=12, per_id=4, size=32, id_offset=0)
    return torch.from_numpy(d["x"]).float() / 255, torch.from_numpy(d["lm"])


@pytest.mark.parametrize("shape", masks.SHAPES)
def test_mask_covers_nose_mouth_chin_and_spares_the_eyes(shape, synth):
    _, lm = synth
    up = 4  # render at 128 px so that pixel rounding does not decide the test
    L = lm * up + (up - 1) / 2
    m, _ = masks.render(L, _params(len(L), shape, seed=1), 32 * up, 32 * up)
    near_chin = L[:, 5] + 0.15 * (L[:, 2] - L[:, 5])  # just above the chin, on the face
    inside = torch.stack([L[:, 2], L[:, 3], L[:, 4], near_chin], 1)
    assert bool((_at(m, inside) == 1).all()), f"{shape}: nose tip, mouth corners or chin left uncovered"
    assert bool((_at(m, L[:, :2]) == 0).all()), f"{shape}: an eye is covered"
    # nothing above the eye line is ever masked (the mask top lies on the nose bridge)
    s, t, _ = masks.face_frame(L, 32 * up, 32 * up)
    assert float(m[:, 0][t < 0].sum()) == 0.0


def test_masked_pixels_only_change_inside_the_mask(synth):
    x, lm = synth
    xm, m, _ = masks.synthesize(x, lm, seed=5)
    assert torch.equal(xm * (1 - m), x * (1 - m))
    assert float(((xm - x).abs() * m).sum()) > 0
    frac = m.mean(dim=(1, 2, 3))
    assert 0.08 < float(frac.min()) and float(frac.max()) < 0.6  # a mask is a part of the face


def test_mask_follows_translation_rotation_and_scale(synth):
    _, lm = synth
    p = masks.sample_params(len(lm), 11)
    m0, _ = masks.render(lm, p, 32, 32)
    # translation by whole pixels: the mask moves with the face
    m1, _ = masks.render(lm + torch.tensor([3.0, -2.0]), p, 32, 32)
    shifted = torch.roll(m0, shifts=(-2, 3), dims=(2, 3))
    core = (slice(None), slice(None), slice(4, 26), slice(5, 27))
    assert float((m1[core] == shifted[core]).float().mean()) > 0.995
    # rotation by 90 degrees about the image centre: the mask rotates with the face
    c = 15.5
    rot = torch.stack([lm[..., 1], 2 * c - lm[..., 0]], -1)  # (x, y) -> (y, 31 - x): rot90 counter-clockwise
    m2, _ = masks.render(rot, p, 32, 32)
    assert float((m2 == torch.rot90(m0, 1, dims=(2, 3))).float().mean()) > 0.995
    # scale: the same face at twice the resolution -> four times the masked area
    m3, _ = masks.render(lm * 2 + 0.5, p, 64, 64)
    ratio = m3.sum(dim=(1, 2, 3)) / m0.sum(dim=(1, 2, 3))
    assert bool(((ratio > 3.6) & (ratio < 4.4)).all()), ratio


def test_seeding():
    d = make_split(seed=1, split_id=0, n_ids=2, per_id=3, size=32, id_offset=0)
    x, lm = torch.from_numpy(d["x"]).float() / 255, torch.from_numpy(d["lm"])
    a, ma, _ = masks.synthesize(x, lm, seed=7)
    b, mb, _ = masks.synthesize(x, lm, seed=7)
    c, mc, _ = masks.synthesize(x, lm, seed=8)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)
    # per-item seeds: an image's mask does not depend on the rest of its batch
    seeds = np.arange(100, 100 + len(x))
    full, _, _ = masks.synthesize(x, lm, seeds, per_item=True)
    part, _, _ = masks.synthesize(x[2:4], lm[2:4], seeds[2:4], per_item=True)
    assert torch.equal(full[2:4], part)


def test_shapes_textures_and_colours_vary(synth):
    _, lm = synth
    n = len(lm)
    areas = {}
    for shape in masks.SHAPES:
        m, _ = masks.render(lm, _params(n, shape, seed=2), 32, 32)
        areas[shape] = float(m.mean())
    assert areas["bandana"] > areas["cup"]  # the bandana reaches below the chin and wider
    assert len({round(a, 3) for a in areas.values()}) >= 4
    stds = {}
    for tex in masks.TEXTURES:
        m, t = masks.render(lm, _params(n, "surgical", tex, seed=4), 32, 32)
        inside = m[:, 0] > 0
        stds[tex] = float(torch.stack([t[i][:, inside[i]].std(dim=1).mean() for i in range(n)]).mean())
    assert all(stds[t] > 2 * stds["solid"] for t in ("stripes", "dots", "checker", "noise")), stds
    p = masks.sample_params(400, 9)
    assert set(p["shape"].tolist()) == set(range(len(masks.SHAPES)))
    assert set(p["texture"].tolist()) == set(range(len(masks.TEXTURES)))
    assert float(np.std(p["colour"], axis=0).mean()) > 0.15
    with pytest.raises(ValueError, match="subset"):
        masks.sample_params(2, 0, {"shapes": ["scarf"]})


@pytest.mark.skipif(not os.path.isdir(REAL), reason="real test photos not present")
def test_masks_on_real_photos_hide_nose_and_mouth_not_eyes():
    from PIL import Image

    names = sorted(HAND)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(REAL, f"{n}_aligned.png")).convert("RGB")).copy())
                     .permute(2, 0, 1).float() / 255 for n in names])
    L = torch.tensor([HAND[n] for n in names], dtype=torch.float32)
    for shape in masks.SHAPES:
        for seed in range(3):
            xm, m = masks.apply(x, L, _params(len(x), shape, "stripes", seed))
            # lower face: the box between the mouth corners, from the nose tip to halfway to the chin
            for i in range(len(x)):
                lm = L[i]
                x0, x1 = int(lm[3, 0]), int(lm[4, 0])
                y0, y1 = int(lm[2, 1]), int((lm[3, 1] + lm[5, 1]) / 2)
                assert float(m[i, 0, y0:y1, x0:x1].mean()) > 0.97, (names[i], shape)
                # lips: strong change of the pixels around the mouth
                my = int(lm[3, 1])
                assert float((xm[i] - x[i]).abs()[:, my - 4 : my + 5, x0:x1].mean()) > 0.05, (names[i], shape)
                for e in (0, 1):  # a 9x9 window around each eye stays untouched
                    ex, ey = int(lm[e, 0]), int(lm[e, 1])
                    assert float(m[i, 0, ey - 4 : ey + 5, max(0, ex - 4) : ex + 5].sum()) == 0, (names[i], shape)
