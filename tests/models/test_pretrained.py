"""Pretrained ViT import: our forward equals timm's on a saved timm ViT; channel rules; errors.

The fixtures (tests/models/fixtures/, written by make_timm_fixture.py in an environment
with torch and timm) are read with our own readers: these tests need no torch. One extra
test regenerates timm's outputs live where torch and timm are importable.
"""

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadapt.models.pretrained import (load_checkpoint, load_pretrained_vit,
                                        patch_weight_for_channels, vit_params_from_state_dict)
from jaxadapt.models.vit import DINOHead, DINOModel, ViT

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PTH = os.path.join(FIXTURES, "vit_tiny.pth")
SAFETENSORS = os.path.join(FIXTURES, "vit_tiny.safetensors")
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
# Measured max |ours - timm| is ~1e-6 (float32 rounding of two implementations); 1e-5
# leaves room for other BLAS/XLA builds while catching any mapping error (those are O(1)).
ATOL = 1e-5


@pytest.fixture(scope="module")
def timm_out():
    with np.load(os.path.join(FIXTURES, "timm_outputs.npz")) as z:
        return {k: z[k] for k in z.files}


def _nhwc(x):
    return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def _tokens(model, params, x):
    out = jax.jit(model.apply)({"params": params}, _nhwc(x))
    return np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["patches"])], 1)


def _template(model, c):
    images = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, c), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _convert(state, model, c=3, rule="cycle", channels=None):
    return vit_params_from_state_dict(state, _template(model, c), in_channels=c,
                                      channel_rule=rule, img_size=model.img_size,
                                      patch_size=model.patch_size, channels=channels)


# ---------------------------------------------------------------------------------------
# Equality with timm


@pytest.mark.parametrize("path", [PTH, SAFETENSORS], ids=["pth", "safetensors"])
def test_forward_equals_timm_at_the_native_size(path, timm_out):
    model = ViT(img_size=32, **TINY)
    params = load_pretrained_vit(path, model, in_channels=3)
    tokens = _tokens(model, params, timm_out["x32"])
    np.testing.assert_allclose(tokens, timm_out["tokens32"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(tokens[:, 0], timm_out["cls32"], rtol=0, atol=ATOL)


def test_both_files_hold_the_same_weights_and_ignore_the_head():
    pth, st = load_checkpoint(PTH), load_checkpoint(SAFETENSORS)
    assert sorted(pth) == sorted(st) and {"head.weight", "head.bias"} <= set(pth)
    assert all(pth[k].dtype == np.float32 and st[k].dtype == np.float16 for k in pth)
    for k in pth:
        np.testing.assert_array_equal(pth[k], st[k].astype(np.float32), err_msg=k)


def test_forward_at_48px_equals_timm_with_dinos_resampling(timm_out):
    """The checkpoint's 4x4 grid resized to 6x6 as DINO does: at run time (a 32 px model on
    48 px images) or at import (a 48 px model), both equal timm with that pos_embed."""
    want = timm_out["tokens48_dino"]
    m32 = ViT(img_size=32, **TINY)
    got = _tokens(m32, load_pretrained_vit(PTH, m32, in_channels=3), timm_out["x48"])
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    m48 = ViT(img_size=48, **TINY)
    p48 = load_pretrained_vit(PTH, m48, in_channels=3)
    assert p48["pos_embed"].shape == (1, 37, 32)
    np.testing.assert_allclose(_tokens(m48, p48, timm_out["x48"]), want, rtol=0, atol=ATOL)


def test_timms_own_resampling_differs_only_in_the_position_embedding(timm_out):
    """timm's dynamic_img_size resizes with F.interpolate(size=6, antialias=True) (Keys
    A = -0.5, scale 4/6, renormalized edges), DINO and we with scale 6.1/4, A = -0.75 and
    clamped taps. With timm's embedding put in, the forward equals timm's; the two
    resamplings themselves differ by a measured amount (0.03 at most on this grid)."""
    m48 = ViT(img_size=48, **TINY)
    params = load_pretrained_vit(PTH, m48, in_channels=3)
    ours = np.asarray(params["pos_embed"])
    timm_pos = timm_out["pos_embed_timm48"]
    np.testing.assert_array_equal(ours[:, 0], timm_pos[:, 0])  # the CLS entry is kept
    gap = np.abs(ours - timm_pos).max()
    assert 1e-4 < gap < 0.1, gap
    params = {**params, "pos_embed": jnp.asarray(timm_pos)}
    np.testing.assert_allclose(_tokens(m48, params, timm_out["x48"]),
                               timm_out["tokens48_timm"], rtol=0, atol=ATOL)


def test_forward_equals_timm_regenerated_live(timm_out):
    """Where torch and timm are importable: rebuild the fixture's timm ViT and compare."""
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from tests.models import make_timm_fixture as mk

    model = mk.build_timm_vit()
    x32, x48 = mk.inputs()
    live = mk.timm_outputs(model, x32, x48)
    for k in ("tokens32", "tokens48_dino", "tokens48_timm"):
        np.testing.assert_allclose(live[k], timm_out[k], rtol=0, atol=ATOL, err_msg=k)
    ours = ViT(img_size=32, **TINY)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(_tokens(ours, _convert(state, ours), x32.numpy()),
                               live["tokens32"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# Channel rules on a 5-channel model


def test_cycle_rule_is_the_references_repeat_on_five_channels():
    w = load_checkpoint(PTH)["patch_embed.proj.weight"]  # (32, 3, 8, 8)
    # cfredinh/coda defaults/models.py: weight.repeat(1, 4, 1, 1)[:, :img_channels].
    want = np.tile(w, (1, 4, 1, 1))[:, :5]
    np.testing.assert_array_equal(patch_weight_for_channels(w, 5, "cycle"), want)
    model = ViT(img_size=32, **TINY)
    params = load_pretrained_vit(PTH, model, in_channels=5, channel_rule="cycle")
    np.testing.assert_array_equal(params["patch_embed"]["kernel"], want.transpose(2, 3, 1, 0))
    assert params["patch_embed"]["kernel"].shape == (8, 8, 5, 32)


def test_select_rule_places_rgb_on_three_channels_and_zeros_the_rest(timm_out):
    state = load_checkpoint(PTH)
    w = state["patch_embed.proj.weight"]
    want = np.zeros((32, 5, 8, 8), np.float32)
    for rgb, c in enumerate((4, 0, 2)):
        want[:, c] = w[:, rgb]
    model = ViT(img_size=32, **TINY)
    params = _convert(state, model, c=5, rule="select", channels=(4, 0, 2))
    np.testing.assert_array_equal(params["patch_embed"]["kernel"], want.transpose(2, 3, 1, 0))
    # The 5-channel model on images whose channels 4, 0, 2 are timm's R, G, B (the others
    # anything) is timm's model.
    x = np.asarray(timm_out["x32"], np.float32)
    x5 = np.random.default_rng(0).normal(size=(2, 5, 32, 32)).astype(np.float32)
    x5[:, [4, 0, 2]] = x
    np.testing.assert_allclose(_tokens(model, params, x5), timm_out["tokens32"], rtol=0,
                               atol=ATOL)


def test_a_dino_model_gets_the_backbone_imported_and_a_fresh_head():
    dino = DINOModel(backbone=ViT(img_size=32, **TINY),
                     head=DINOHead(out_dim=12, hidden_dim=16, bottleneck_dim=8))
    params = load_pretrained_vit(PTH, dino, in_channels=3, rng=jax.random.key(0))
    np.testing.assert_array_equal(params["backbone"]["cls_token"],
                                  load_checkpoint(PTH)["cls_token"])
    assert params["head"]["last_layer"]["kernel"].shape == (8, 12)
    with pytest.raises(ValueError, match="pass rng="):
        load_pretrained_vit(PTH, dino, in_channels=3)


# ---------------------------------------------------------------------------------------
# Readers


def test_wrapped_checkpoints_are_opened_and_prefixes_stripped(tmp_path):
    state = load_checkpoint(PTH)
    path = tmp_path / "dino.npz"
    np.savez(path, **{"module.backbone." + k: v for k, v in state.items()})
    assert list(load_checkpoint(path)) == list(state)


def _write_safetensors(path, tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, (dtype, shape, raw) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_bfloat16_is_widened_exactly(tmp_path):
    vals = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)  # bfloat16-exact values
    raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    _write_safetensors(tmp_path / "b.safetensors", {"w": ("BF16", (2, 2), raw)})
    got = load_checkpoint(tmp_path / "b.safetensors")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vals.reshape(2, 2))


# ---------------------------------------------------------------------------------------
# Bad input


def test_a_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "deit_small_patch16_224.pth")
    with pytest.raises(ValueError, match="deit_small_patch16_224.pth' does not exist"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained_vit(path, ViT(img_size=32, **TINY), in_channels=3)


def test_a_missing_key_is_named():
    state = load_checkpoint(PTH)
    del state["blocks.1.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"key 'blocks.1.mlp.fc1.bias' is missing"):
        _convert(state, ViT(img_size=32, **TINY))


def test_a_mismatched_shape_names_the_key_and_both_shapes():
    model = ViT(img_size=32, mlp_ratio=2.0, **TINY)  # fc1 has 64 units, the file 128
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.weight' has shape \(128, 32\) "
                                         r"but the ViT needs \(64, 32\)"):
        _convert(load_checkpoint(PTH), model)


def test_a_key_left_unused_is_named():
    state = {**load_checkpoint(PTH), "blocks.0.ls1.gamma": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match=r"'blocks.0.ls1.gamma' has no place in the ViT"):
        _convert(state, ViT(img_size=32, **TINY))
    # The distilled DeiT's extras are ignored (the token's position entry dropped).
    state = load_checkpoint(PTH)
    pos = state["pos_embed"]
    state.update(dist_token=np.zeros((1, 1, 32), np.float32),
                 pos_embed=np.concatenate([pos[:, :1], np.ones_like(pos[:, :1]), pos[:, 1:]], 1),
                 **{"head_dist.weight": np.zeros((10, 32), np.float32)})
    params = _convert(state, ViT(img_size=32, **TINY))
    np.testing.assert_array_equal(params["pos_embed"], pos)


@pytest.mark.parametrize("c, rule, channels, match", [
    (2, "select", (0, 1, 2), "needs in_channels >= 3"),
    (5, "select", None, "needs channels=\\(i, j, k\\)"),
    (5, "select", (0, 0, 1), "3 distinct channel indices in \\[0, 5\\)"),
    (5, "rotate", None, "channel_rule='rotate' is unknown"),
])
def test_a_channel_count_the_rule_cannot_map(c, rule, channels, match):
    with pytest.raises(ValueError, match=match):
        _convert(load_checkpoint(PTH), ViT(img_size=32, **TINY), c, rule, channels)


def test_a_checkpoint_without_three_input_channels_maps_only_to_its_own_count():
    state = load_checkpoint(PTH)
    w = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = np.tile(w, (1, 2, 1, 1))[:, :4]  # a 4-channel file
    with pytest.raises(ValueError, match="has 4 input channels; the channel rules map 3"):
        _convert(state, ViT(img_size=32, **TINY), 5)
    kernel = _convert(state, ViT(img_size=32, **TINY), 4)["patch_embed"]["kernel"]
    np.testing.assert_array_equal(kernel, state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))


def test_depth_and_width_mismatches_are_named():
    state = load_checkpoint(PTH)
    with pytest.raises(ValueError, match="checkpoint has depth 2 .* ViT has depth 3; build "
                                         "the ViT with depth=2"):
        _convert(state, ViT(img_size=32, **{**TINY, "depth": 3}))
    with pytest.raises(ValueError, match="checkpoint's embed_dim is 32 .* the ViT's is 16; "
                                         "build the ViT with embed_dim=32"):
        _convert(state, ViT(img_size=32, **{**TINY, "embed_dim": 16}))


def _zip_pickle(path, obj_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", obj_bytes)
        z.writestr("archive/version", "3\n")


def test_an_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    _zip_pickle(path, pickle.dumps({"cls_token": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"uses the global posix.mkdir.*refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_non_state_dicts_and_legacy_files_are_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        load_checkpoint(path)
    path = tmp_path / "ints.pth"
    _zip_pickle(path, pickle.dumps({"epoch": 3}, protocol=2))
    with pytest.raises(ValueError, match="entry 'epoch' is a int, not a tensor"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="suffix '.ckpt'"):
        (tmp_path / "x.ckpt").write_bytes(b"")
        load_checkpoint(tmp_path / "x.ckpt")
