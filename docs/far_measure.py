"""The numbers in docs/far.md: `PYTHONPATH=$PWD python docs/far_measure.py` (CPU, about a minute).

Tiny random models (the unit-test shapes, plus the toy8 shape); every figure is a relative
root-mean-square difference, rms(a - b) / rms(b), unless said otherwise. Prints one JSON line.
"""

import json

import torch
import torch.nn.functional as F

from pipeline.flowmap import far, models
from pipeline.flowmap.models import StudentFn

SHIFT = 5.0


def rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def student(size):
    torch.manual_seed(0)
    s = models.student_from_teacher(models.build_teacher(size, seed=0))
    with torch.no_grad():
        for p in s.condition_embedder.delta_embedder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return s.eval()


def far_model(bidi, cp, limit, pad):
    m = far.far_from_bidirectional(bidi, cp, limit).eval()
    far.set_far_attention(m, "dense", pad)
    return m


def data(shape, text_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(shape[0], 5, text_dim, generator=g)


def padding(size, hw, cp, limit):
    """Trap (b): the diffusers form against the unpadded one, per call and per sample."""
    bidi = student(size)
    text_dim = bidi.config.text_dim
    noise, cond = data((2, sum(cp), 4, hw, hw), text_dim, 3)
    t = torch.full((2,), 0.8, dtype=torch.float64)
    forms = {pad: far_model(bidi, cp, limit, pad) for pad in far.PAD_FORMS}
    out = {}
    with torch.no_grad():
        one = noise[:, :cp[0]]
        ref = StudentFn(bidi)(one, t, 0.4 * t, cond)
        got = {p: far.ChunkFn(m, far.empty_cache(m, one), cp[:1])(one, t, 0.4 * t, cond) for p, m in forms.items()}
        out["first_chunk_vs_bidirectional"] = {p: rel(g, ref) for p, g in got.items()}
        out["first_chunk_max_abs_diffusers_vs_none"] = float((got["diffusers"] - got["none"]).abs().max())
        for n in (1, 2, 4):
            a = far.far_sample(forms["diffusers"], noise, cond, n, SHIFT)
            b = far.far_sample(forms["none"], noise, cond, n, SHIFT)
            out[f"sample_N{n}_diffusers_vs_none"] = rel(a, b)
    tpf = (hw // 2) ** 2
    out["zero_keys_per_chunk"] = [far.pad_keys(f * tpf) for f in cp]
    return out


def wan_zero_key_fraction():
    """Share of zero keys in each inference call at Wan 480p (60 x 104 latents, 1560 tokens a
    frame, compressed 390), partition 1, 3 x 6, 2, full_chunk_limit 3 (no model needed)."""
    cp, limit, full, comp = [1, 3, 3, 3, 3, 3, 3, 2], 3, 1560, 390
    fracs = []
    for c, f in enumerate(cp):
        n_comp = max(c + 1 - limit, 0)
        keys = sum(cp[:n_comp]) * comp + sum(cp[n_comp:c]) * full + f * full
        pad = far.pad_keys(f * full)
        fracs.append(round(pad / (keys + pad), 4))
    return fracs


def coarse_init_scale():
    """rms(coarse token) / rms(fine token) (bias excluded), ours against diffusers' trilinear init,
    on smooth latents (bilinear upsampling of 4x4 noise to 16x16) and on white noise."""
    torch.manual_seed(0)
    fine = torch.nn.Conv3d(4, 64, (1, 2, 2), (1, 2, 2), bias=False)
    w_ours = far.coarse_patch_weight(fine.weight.data, (1, 4, 4))
    w_diff = F.interpolate(fine.weight.data.view(-1, 1, 1, 2, 2), size=(1, 4, 4), mode="trilinear",
                           align_corners=False).view(64, 4, 1, 4, 4)
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(8, 4, 4, 4, generator=g), size=(16, 16), mode="bilinear",
                           align_corners=False).unsqueeze(2)
    white = torch.randn(8, 4, 1, 16, 16, generator=g)
    res = {}
    for name, x in (("smooth", smooth), ("white", white)):
        f_rms = fine(x).pow(2).mean().sqrt()
        res[name] = {k: round(float(F.conv3d(x, w, stride=(1, 4, 4)).pow(2).mean().sqrt() / f_rms), 3)
                     for k, w in (("ours", w_ours), ("diffusers_trilinear", w_diff))}
    return res


def shared_cache_gradient_error():
    """Trap (a): relative gradient error of an in-place cache under checkpointing."""
    import sys
    sys.path.insert(0, "tests/flowmap")
    import test_far as T
    model = T._far(T._bidi("tiny"))
    plain = T._dmd_grads(model, False)
    return {"fresh": float((T._dmd_grads(model, True) - plain).norm() / plain.norm()),
            "in_place": float((T._dmd_grads(model, True, shared_cache=True) - plain).norm() / plain.norm())}


def teacher_forcing_older_chunks():
    """The older noisy chunks of a teacher-forced sample see their oldest context compressed,
    where the sampler sees part of it at full resolution: the size of that mismatch."""
    bidi = student("tiny")
    cp, limit = [1, 2, 2, 2], 2
    m = far_model(bidi, cp, limit, "diffusers")
    x, cond = data((2, 7, 4, 8, 8), 16, 7)
    noise = data((2, 4, 4, 8, 8), 16, 12)[0]
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    inputs = far.teacher_forced_inputs(x, noise, t, 0.5 * t, cp, limit)
    with torch.no_grad():
        u = far.teacher_forced_forward(m, inputs, cond)
        c2 = far.ChunkFn(m, far.write_cache(m, x[:, :3], cp[:2], cond), cp[:3])(inputs.hidden_states[:, 3:5], t,
                                                                                 0.5 * t, cond)
        c3 = far.ChunkFn(m, far.write_cache(m, x[:, :5], cp[:3], cond), cp)(inputs.hidden_states[:, 5:], t, 0.5 * t,
                                                                            cond)
    return {"chunk2_older": rel(u[:, :2], c2), "chunk3_newest": rel(u[:, 2:], c3)}


def flex_backward_on_cpu():
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.randn(1, 1, 128, 16, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
        return "works"
    except Exception as exc:  # noqa: BLE001 - the message is the measurement
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps({
        "padding_tiny_8x8_cp1222": padding("tiny", 8, [1, 2, 2, 2], 2),
        "padding_toy8_16x16_cp1222": padding("toy8", 16, [1, 2, 2, 2], 3),
        "wan480p_zero_key_fraction_per_chunk": wan_zero_key_fraction(),
        "coarse_init_scale": coarse_init_scale(),
        "shared_cache_gradient_error": shared_cache_gradient_error(),
        "teacher_forcing_vs_sampler": teacher_forcing_older_chunks(),
        "flex_backward_on_cpu": flex_backward_on_cpu(),
    }))
