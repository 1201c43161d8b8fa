"""Import DeiT / timm / DINO ViT checkpoints (.pth, .safetensors, .npz) into our `ViT`.

Readers: torch's zip format (``torch.save`` since 1.6) is read without torch: the archive
holds ``<prefix>/data.pkl`` and one raw file per storage, ``<prefix>/data/<key>``; the
pickle is loaded by a restricted Unpickler that knows only the globals a saved state dict
uses (torch's tensor rebuild functions, its typed storages, ``collections.OrderedDict``)
and refuses every other global, so a checkpoint cannot run code. safetensors is parsed by
hand (8-byte little-endian header length, a JSON header, a raw buffer), so neither torch
nor the safetensors package is a requirement.

Mapping: the DeiT/timm/DINO key names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) onto the layout
`jaxadapt.models.vit` documents (conv OIHW -> HWIO, linear (out, in) -> (in, out), qkv in
torch's (3, heads, head_dim) order). The position embedding is resized to the model's grid
with `interpolate_pos_embed` (DINO's bicubic, as our ViT resizes at run time); the patch
embedding's 3 RGB input channels are mapped to C channels by a named rule
(`patch_weight_for_channels`).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxadapt.models.pos_embed import interpolate_pos_embed
from jaxadapt.models.vit import DINOModel, ViT

__all__ = [
    "CHANNEL_RULES", "IGNORED_KEYS", "load_checkpoint", "load_pretrained_vit",
    "patch_weight_for_channels", "vit_params_from_state_dict",
]

#: Rules mapping a checkpoint's 3 RGB patch-embedding input channels onto C channels.
CHANNEL_RULES = ("cycle", "select")

#: Checkpoint keys the import skips: the classifier (``head.*``, also DINO's projection
#: head ``head.mlp.*`` / ``head.last_layer.*``) and DeiT-distilled's distillation token
#: and head. Skipping the distillation token changes the model: in DeiT-distilled the CLS
#: token attends to it, so the imported ViT is DeiT-distilled without its second token
#: (its forward is not the distilled model's).
IGNORED_KEYS = ("head.*", "head_dist.*", "dist_token")

# Wrapper keys of whole training checkpoints, tried in this order: DINO's checkpoint.pth
# holds {"student", "teacher", ...} and DINO evaluates the teacher; the reference's
# (cfredinh/coda) checkpoints use "state_dict"; DeiT's releases {"model": ...}.
_WRAPPERS = ("teacher", "state_dict", "model")
# DDP's "module." and DINO's MultiCropWrapper "backbone." prefixes.
_PREFIXES = ("module.", "backbone.")


# ---------------------------------------------------------------------------------------
# Readers


class _Storage:
    """A torch typed-storage class as the restricted unpickler stands it in: its dtype."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype


# torch.<Name>Storage -> how its bytes read. "bfloat16" is read as uint16 and widened.
_STORAGES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def _bfloat16_to_float32(u16: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32: widening is exact.
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *_unused: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 restated: a strided view of a storage, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise ValueError(f"torch checkpoint: a tensor of size {size}, stride {stride} at "
                         f"offset {offset} overruns its storage of {storage.size} elements; "
                         f"the file is corrupt")
    view = np.lib.stride_tricks.as_strided(
        storage[int(offset):], shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter (an nn.Parameter saved with keep_vars): its data."""
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl into numpy arrays, refusing other code.

    Allowed globals: collections.OrderedDict, torch._utils._rebuild_tensor_v2 and
    _rebuild_parameter, the torch.<Type>Storage classes, and argparse.Namespace (DINO's
    checkpoint.pth stores its command-line args as one; a Namespace only holds attributes).
    """

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("argparse", "Namespace"): argparse.Namespace,
    }

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str, path: str,
                 big_endian: bool):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._big_endian = big_endian
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _Storage(name, _STORAGES[name])
        raise ValueError(
            f"{self._path}: the checkpoint's pickle uses the global {module}.{name}, which "
            f"a state dict does not need; refused (unpickling it could run code). Save "
            f"only the state dict (torch.save(model.state_dict(), path)) or convert it to "
            f".safetensors")

    def persistent_load(self, pid: Any) -> np.ndarray:
        # torch.save writes ('storage', storage_type, key, location, numel) per storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Storage)):
            raise ValueError(f"{self._path}: unknown persistent id {pid!r} in the pickle; "
                             f"not a torch state dict")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise ValueError(f"{self._path}: the pickle names storage {key!r}, which the "
                                 f"archive lacks ({self._prefix}data/{key}); the file is "
                                 f"truncated or corrupt") from None
            if kind.dtype == "bfloat16":
                arr = _bfloat16_to_float32(np.frombuffer(
                    raw, ">u2" if self._big_endian else "<u2"))
            else:
                dtype = np.dtype(kind.dtype)
                arr = np.frombuffer(raw, dtype.newbyteorder(">") if self._big_endian
                                    else dtype)
            if arr.size != int(numel):
                raise ValueError(f"{self._path}: storage {key} holds {arr.size} elements, "
                                 f"the pickle says {numel}; the file is corrupt")
            self._storages[key] = arr.astype(arr.dtype.newbyteorder("="))
        return self._storages[key]


def _read_torch(path: str) -> Any:
    """The object torch.save wrote to a zip-format .pth/.pt file, tensors as numpy arrays."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a torch zip checkpoint (torch.save's format since torch 1.6); "
            f"the legacy format is not read: re-save it with a recent torch "
            f"(torch.save(torch.load(path), path)) or convert it to .safetensors")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl")
                and n.count("/") <= 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: a torch zip checkpoint holds one <prefix>/data.pkl; "
                             f"found {pkls or 'none'}")
        prefix = pkls[0][: -len("data.pkl")]
        names = set(archive.namelist())
        big = (f"{prefix}byteorder" in names
               and archive.read(f"{prefix}byteorder").strip() == b"big")
        unpickler = _TorchUnpickler(io.BytesIO(archive.read(pkls[0])), archive, prefix, path,
                                    big)
        return unpickler.load()


# safetensors dtype names -> numpy (BF16 is widened to float32).
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
              "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file: u64 little-endian header length N, N bytes of JSON, raw data."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{path}: safetensors header length {n} exceeds the file's "
                         f"{len(data)} bytes; not a safetensors file")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not JSON ({e})") from None
    buf = memoryview(data)[8 + n:]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}; readable dtypes "
                             f"are {sorted(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        if end - begin != math.prod(shape) * np_dtype.itemsize or end > len(buf):
            raise ValueError(f"{path}: tensor {key!r} (shape {shape}, {dtype}) does not fit "
                             f"its data offsets [{begin}, {end}); the file is corrupt")
        arr = np.frombuffer(buf[begin:end], np_dtype).reshape(shape)
        arr = _bfloat16_to_float32(arr) if dtype == "BF16" else arr
        out[key] = arr.astype(arr.dtype.newbyteorder("="))
    return out


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The state dict inside a checkpoint: wrappers opened, DDP/DINO prefixes stripped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping "
                         f"of parameter names to tensors)")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; the file "
                f"is not a state dict, nor one wrapped under {list(_WRAPPERS)}")
        name = str(key)
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in state:
            raise ValueError(f"{path}: keys {key!r} and another both become {name!r} once "
                             f"the prefixes {list(_PREFIXES)} are stripped")
        state[name] = value
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ViT state dict from a .pth/.pt, .safetensors or .npz file, without torch.

    A wrapped training checkpoint is opened: ``{"teacher": ...}`` (DINO's checkpoint.pth:
    the teacher, as DINO evaluates), ``{"state_dict": ...}``, ``{"model": ...}`` (DeiT's
    releases); the prefixes ``module.`` (DDP) and ``backbone.`` (DINO's multi-crop
    wrapper) are stripped from the keys.

    Args:
      path: the checkpoint file; its suffix picks the reader.

    Returns:
      Parameter name -> numpy array in the checkpoint's dtype (bfloat16 widened to
      float32), in the file's order.

    Raises:
      ValueError: the file is missing, has another suffix, is a legacy (pre-1.6) torch
        file, or its pickle uses a global other than torch's tensor rebuilding ones.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist; give the path of a "
                         f".pth/.pt, .safetensors or .npz file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pth", ".pt"):
        obj = _read_torch(path)
    elif suffix == ".safetensors":
        obj = _read_safetensors(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    else:
        raise ValueError(f"checkpoint {path!r} has suffix {suffix!r}; use a .pth/.pt, "
                         f".safetensors or .npz file")
    return _unwrap(obj, path)


# ---------------------------------------------------------------------------------------
# Mapping onto our ViT


def patch_weight_for_channels(weight: np.ndarray, in_channels: int, rule: str,
                              channels: tuple[int, int, int] | None = None) -> np.ndarray:
    """Map a patch conv's (D, 3, p, p) RGB weight to (D, C, p, p) by a named rule.

    ``"cycle"``: input channel c gets RGB filter c mod 3, unscaled. This is the
    reference's ``modify_first_layer`` (cfredinh/coda, defaults/models.py:
    ``weight.repeat(1, 4, 1, 1)[:, :img_channels]``, the bias kept); the reference's repeat
    stops at 12 channels, the cycle continues past it.
    ``"select"``: the RGB filters go to the 3 input channels ``channels`` (as the
    reference's use of 3 of the 5 Cell Painting channels), every other channel's filter
    is zero, so the model starts as the checkpoint looking at those 3 channels.

    Args:
      weight: (D, 3, p, p) torch OIHW weight.
      in_channels: C, the model's input channels.
      rule: one of `CHANNEL_RULES`.
      channels: for "select", 3 distinct channel indices in [0, C) that receive R, G, B
        (default (0, 1, 2) when C == 3); unused by "cycle".

    Returns:
      (D, C, p, p) weight, the dtype of `weight`.

    Raises:
      ValueError: an unknown rule, a weight without 3 input channels, "select" with
        C < 3 or bad `channels`.
    """
    if rule not in CHANNEL_RULES:
        raise ValueError(f"channel_rule={rule!r} is unknown; use one of {list(CHANNEL_RULES)}")
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"patch_embed.proj.weight has shape {weight.shape}; the channel "
                         f"rules map a (D, 3, p, p) RGB weight")
    c = int(in_channels)
    if c < 1:
        raise ValueError(f"in_channels={in_channels}; use an integer >= 1")
    if rule == "cycle":
        return weight[:, [i % 3 for i in range(c)]]
    if c < 3:
        raise ValueError(f"channel_rule='select' needs in_channels >= 3 to place the 3 RGB "
                         f"filters; the model has in_channels={c}: use channel_rule='cycle'")
    if channels is None:
        if c != 3:
            raise ValueError(f"channel_rule='select' with in_channels={c} needs "
                             f"channels=(i, j, k): the 3 of the {c} channels that get the "
                             f"R, G, B filters")
        channels = (0, 1, 2)
    sel = tuple(int(i) for i in channels)
    if len(sel) != 3 or len(set(sel)) != 3 or not all(0 <= i < c for i in sel):
        raise ValueError(f"channels={tuple(channels)!r}: give 3 distinct channel indices in "
                         f"[0, {c}) for channel_rule='select'")
    out = np.zeros((weight.shape[0], c) + weight.shape[2:], weight.dtype)
    out[:, list(sel)] = weight
    return out


def _ignored(key: str) -> bool:
    return key == "dist_token" or key.startswith(("head.", "head_dist."))


def _leaf(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _block_paths(i: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(torch key, Flax path, transpose) for block i; linear weights are transposed."""
    out = []
    for torch_mod, flax_mod in (("norm1", ("norm1",)), ("attn.qkv", ("attn", "qkv")),
                                ("attn.proj", ("attn", "proj")), ("norm2", ("norm2",)),
                                ("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2"))):
        norm = torch_mod.startswith("norm")
        out.append((f"blocks.{i}.{torch_mod}.weight",
                    (f"block{i}",) + flax_mod + ("scale" if norm else "kernel",), not norm))
        out.append((f"blocks.{i}.{torch_mod}.bias", (f"block{i}",) + flax_mod + ("bias",),
                    False))
    return out


def vit_params_from_state_dict(
        state: Mapping[str, np.ndarray], params_template: Any, *, in_channels: int,
        channel_rule: str, img_size: int, patch_size: int,
        channels: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Our ViT's params from a DeiT/timm/DINO state dict, every parameter accounted for.

    Keys used: ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``,
    ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
    ``norm.{weight,bias}``; skipped: `IGNORED_KEYS` (classifier, DINO head, DeiT's
    distillation token and head, whose position entry is dropped too). The position
    embedding is resized from the checkpoint's grid to img_size // patch_size per side
    with `interpolate_pos_embed` (DINO's bicubic); the patch embedding's 3 RGB input
    channels go to C by `patch_weight_for_channels` (a checkpoint already with C input
    channels is copied). The number of heads is not stored in a state dict: the model's
    num_heads must be the checkpoint's (DeiT-S: 6), or attention splits differently.

    Args:
      state: the state dict (`load_checkpoint`'s result).
      params_template: the ViT's "params" tree (arrays or jax.ShapeDtypeStruct leaves, e.g.
        from `jax.eval_shape(model.init, ...)`), or a {"params": tree} variables dict.
      in_channels: C, the model's input channels.
      channel_rule: "cycle" or "select" (see `patch_weight_for_channels`).
      img_size: the model's `img_size`; patch_size: its `patch_size`.
      channels: the 3 channels of "select".

    Returns:
      A params tree with the template's structure, dtypes and shapes (jax arrays).

    Raises:
      ValueError: naming the first missing key; the first key whose shape differs (both
        shapes); the first key neither used nor ignored; a channel count the rule cannot
        map; a depth or width (embed_dim) that differs from the checkpoint's.
    """
    wrapped = isinstance(params_template, Mapping) and set(params_template) == {"params"}
    tpl = params_template["params"] if wrapped else params_template
    try:
        kernel = _leaf(tpl, ("patch_embed", "kernel"))
        d = _leaf(tpl, ("cls_token",)).shape[-1]
        tpl_pos = _leaf(tpl, ("pos_embed",))
    except (KeyError, TypeError):
        raise ValueError("params_template is not a ViT's params tree (it lacks patch_embed, "
                         "cls_token or pos_embed); pass jax.eval_shape(vit.init, key, "
                         "images)['params']") from None
    depth = sum(1 for k in tpl if re.fullmatch(r"block\d+", k))
    g = img_size // patch_size
    if tuple(kernel.shape[:3]) != (patch_size, patch_size, in_channels):
        raise ValueError(f"the template's patch kernel has shape {tuple(kernel.shape)}, not "
                         f"({patch_size}, {patch_size}, {in_channels}, D) for "
                         f"patch_size={patch_size}, in_channels={in_channels}; pass the "
                         f"model's patch_size and in_channels")
    if tuple(tpl_pos.shape) != (1, 1 + g * g, d):
        raise ValueError(f"the template's pos_embed has shape {tuple(tpl_pos.shape)}, not "
                         f"(1, {1 + g * g}, {d}) for img_size={img_size}, "
                         f"patch_size={patch_size}; pass the model's img_size")

    # Width and depth first: they explain every later shape or key error at once.
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key in state:
            w = state[key].shape[-1] if key == "cls_token" else state[key].shape[0]
            if w != d:
                raise ValueError(
                    f"the checkpoint's embed_dim is {w} ({key} has shape "
                    f"{tuple(state[key].shape)}) but the ViT's is {d}; build the ViT with "
                    f"embed_dim={w} (and the checkpoint's num_heads)")
            break
    ckpt_blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    ckpt_depth = max(ckpt_blocks) + 1 if ckpt_blocks else 0
    if ckpt_depth != depth:
        raise ValueError(f"the checkpoint has depth {ckpt_depth} (blocks.0 .. "
                         f"blocks.{ckpt_depth - 1}) but the ViT has depth {depth}; build "
                         f"the ViT with depth={ckpt_depth}")

    plan: list[tuple[str, tuple[str, ...], bool]] = [
        ("cls_token", ("cls_token",), False), ("pos_embed", ("pos_embed",), False),
        ("patch_embed.proj.weight", ("patch_embed", "kernel"), False),
        ("patch_embed.proj.bias", ("patch_embed", "bias"), False)]
    for i in range(depth):
        plan += _block_paths(i)
    plan += [("norm.weight", ("norm", "scale"), False), ("norm.bias", ("norm", "bias"), False)]
    missing = next((k for k, _, _ in plan if k not in state), None)
    if missing is not None:
        raise ValueError(f"checkpoint key {missing!r} is missing (the first of the ViT's "
                         f"keys absent); the file is not a DeiT/timm/DINO ViT state dict "
                         f"of this layout (keys seen: {list(state)[:6]} ...)")

    def mismatch(key: str, got: tuple, want: tuple, flax_path: tuple[str, ...]) -> ValueError:
        return ValueError(
            f"checkpoint key {key!r} has shape {tuple(got)} but the ViT needs "
            f"{tuple(want)} (torch layout; Flax param {'/'.join(flax_path)}); build the ViT "
            f"with the checkpoint's sizes (embed_dim, depth, mlp_ratio, patch_size)")

    values: dict[tuple[str, ...], np.ndarray] = {}
    for key, flax_path, transpose in plan:
        src = np.asarray(state[key])
        want = tuple(_leaf(tpl, flax_path).shape)
        if key == "pos_embed":
            values[flax_path] = _pos_embed(state, g, d, flax_path, mismatch)
            continue
        if key == "patch_embed.proj.weight":
            torch_want = (d, in_channels, patch_size, patch_size)
            if src.ndim != 4 or (src.shape[0],) + src.shape[2:] != (d, patch_size, patch_size):
                raise mismatch(key, src.shape, torch_want, flax_path)
            if src.shape[1] == 3:
                src = patch_weight_for_channels(src, in_channels, channel_rule, channels)
            elif src.shape[1] != in_channels:
                raise ValueError(
                    f"patch_embed.proj.weight has {src.shape[1]} input channels; the channel "
                    f"rules map 3 (RGB) and the ViT has in_channels={in_channels}: use a "
                    f"checkpoint with 3 or {in_channels} input channels")
            values[flax_path] = src.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            continue
        torch_want = want[::-1] if transpose else want
        if tuple(src.shape) != torch_want:
            raise mismatch(key, src.shape, torch_want, flax_path)
        values[flax_path] = src.T if transpose else src

    used = {k for k, _, _ in plan}
    unused = next((k for k in state if k not in used and not _ignored(k)), None)
    if unused is not None:
        raise ValueError(
            f"checkpoint key {unused!r} has no place in the ViT and is not one of the "
            f"ignored {list(IGNORED_KEYS)}; the checkpoint has parts this ViT lacks "
            f"(e.g. layer scale, register tokens, a pooling norm): use a plain DeiT/timm/DINO "
            f"ViT checkpoint, or remove the key if dropping it is intended")

    flat_tpl = _flatten(tpl)
    extra = [p for p in flat_tpl if p not in values]
    if extra:
        raise ValueError(f"the ViT's param {'/'.join(extra[0])} has no checkpoint "
                         f"counterpart; this importer maps the plain ViT of "
                         f"jaxadapt.models.vit")
    out: dict[str, Any] = {}
    for p, leaf in flat_tpl.items():
        node = out
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = jnp.asarray(values[p], leaf.dtype)
    return {"params": out} if wrapped else out


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def _pos_embed(state: Mapping[str, np.ndarray], g: int, d: int, flax_path: tuple[str, ...],
               mismatch: Any) -> np.ndarray:
    """The checkpoint's (1, 1 + n*n, D) position embedding resized to the grid g x g."""
    pe = np.asarray(state["pos_embed"], np.float32)
    # DeiT-distilled stores a second prefix entry, for its distillation token (dropped).
    n_prefix = 2 if "dist_token" in state else 1
    n = pe.shape[1] - n_prefix if pe.ndim == 3 else -1
    src = math.isqrt(n) if n > 0 else 0
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d or src * src != n:
        raise mismatch("pos_embed", pe.shape, (1, n_prefix + g * g, d), flax_path)
    pe = np.concatenate([pe[:, :1], pe[:, n_prefix:]], axis=1)
    if src != g:
        # The checkpoint's grid (e.g. 14 for 224 px / 16) resized once to the model's, the
        # same bicubic our ViT applies at run time (src_grid = the stored grid's side).
        pe = np.asarray(interpolate_pos_embed(jnp.asarray(pe), (g, g), src))
    return pe


def load_pretrained_vit(path: str | os.PathLike, model: Any, *, in_channels: int,
                        channel_rule: str = "cycle",
                        channels: tuple[int, int, int] | None = None,
                        rng: jax.Array | None = None) -> dict[str, Any]:
    """Params for `model` from a DeiT/timm/DINO ViT checkpoint file.

    Args:
      path: a .pth/.pt, .safetensors or .npz checkpoint (see `load_checkpoint`).
      model: a `ViT`, or a `DINOModel` whose backbone is one (its head is initialized from
        `rng`, the backbone imported).
      in_channels: C, the channels of the images the model will see (a ViT takes any C,
        so the module does not know it).
      channel_rule: "cycle" (the reference's modify_first_layer) or "select"; see
        `patch_weight_for_channels`.
      channels: for "select", the 3 channels that get the RGB filters.
      rng: key for a DINOModel's head; not used for a ViT (every parameter is imported).

    Returns:
      The "params" collection (apply with ``model.apply({"params": params}, x)``).

    Raises:
      ValueError: as `load_checkpoint` and `vit_params_from_state_dict`; a DINOModel
        without `rng`.
    """
    vit = model.backbone if isinstance(model, DINOModel) else model
    if not isinstance(vit, ViT):
        raise ValueError(f"model is a {type(model).__name__}; load_pretrained_vit imports "
                         f"into a ViT or a DINOModel with a ViT backbone")
    if isinstance(model, DINOModel) and rng is None:
        raise ValueError("model is a DINOModel: pass rng=jax.random.key(...) to initialize "
                         "its head (only the backbone comes from the checkpoint)")
    state = load_checkpoint(path)
    images = jax.ShapeDtypeStruct((1, vit.img_size, vit.img_size, in_channels), jnp.float32)
    template = jax.eval_shape(vit.init, jax.random.key(0), images)["params"]
    params = vit_params_from_state_dict(
        state, template, in_channels=in_channels, channel_rule=channel_rule,
        img_size=vit.img_size, patch_size=vit.patch_size, channels=channels)
    if isinstance(model, DINOModel):
        head = model.head.init(rng, jnp.zeros((1, vit.embed_dim), jnp.float32))["params"]
        return {"backbone": params, "head": head}
    return params
