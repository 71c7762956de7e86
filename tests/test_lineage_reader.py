"""The model file reader (``service.store.lineage.read_checkpoint``) against hostile uploads.

An upload is read before any worker ``torch.load``s it, so what the reader lets through must be
cheap for the service to check and cheap for a worker to load: no expansion of shared or deep
structures (in checks, messages or the stored lineage), no way for the file to change the
reader itself, and no storage larger than the bytes the file holds.
"""

from __future__ import annotations

import io
import pickle
import struct
import time
import types
import zipfile
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from seqtune.errors import Invalid
from service.store import lineage
from service.store.lineage import read_checkpoint
from worker.checkpoints import decode_model, encode
from worker.model import LSTMModel, ModelArgs


def _ckpt(**over: Any) -> dict[str, Any]:
    """A seqtune checkpoint of a 1-input, 1 x 8-unit forecaster, as engine.make_checkpoint
    makes it, with ``over`` replacing its keys."""
    model = LSTMModel(ModelArgs(1, 8, 1, 0.0, False, 0.0, 1))
    out = {
        "format": 2,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": model.args.to_dict(),
        "task": "forecast",
        "features": ["y"],
        "targets": ["y"],
        "horizon": 1,
        "seq_len": 8,
        "lineage": None,
    }
    return out | over


def _with_weight(name: str, tensor: torch.Tensor) -> bytes:
    ckpt = _ckpt()
    assert ckpt["state_dict"][name].shape == tensor.shape
    ckpt["state_dict"][name] = tensor
    return encode(ckpt)


def _zip_pickle(raw: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def _u(s: str) -> bytes:
    """A pickle BINUNICODE opcode."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _rezip(
    blob: bytes,
    *,
    compression: int = zipfile.ZIP_STORED,
    drop: tuple[str, ...] = (),
    extra: tuple[tuple[str, bytes], ...] = (),
    replace: dict[str, bytes] | None = None,
) -> bytes:
    """``blob``'s archive written again by Python's zipfile."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as zf:
        for info in src.infolist():
            if info.filename not in drop:
                zf.writestr(info.filename, (replace or {}).get(info.filename, src.read(info)))
        for name, data in extra:
            zf.writestr(name, data)
    return out.getvalue()


def _refused(blob: bytes, match: str = "") -> Invalid:
    with pytest.raises(Invalid, match=match) as caught:
        read_checkpoint(blob)
    exc = caught.value
    assert "not a seqtune model file" in exc.message
    assert len(exc.message) < 600 and all(len(d["reason"]) < 1000 for d in exc.details), exc
    return exc


# ---- 1. expansion: shared references, deep nesting, big values ---------------------------------


def _shared(levels: int, fanout: int = 10) -> list[Any]:
    x: list[Any] = [0]
    for _ in range(levels):
        x = [x] * fanout  # each level holds `fanout` references to the one below
    return x


def test_shared_references_are_counted_not_expanded() -> None:
    # 100,000 values from a pickle of a few hundred bytes: counted as reached, refused with a
    # short message (the value is never repr'd), in well under a second.
    raw = pickle.dumps({"state_dict": {}, "format": _shared(5)}, protocol=2)
    assert len(raw) < 400
    t0 = time.perf_counter()
    _refused(_zip_pickle(raw), "over 100000 values")
    # The same in a real checkpoint's lineage, which json.dumps would expand and every
    # fine-tuned trial would copy.
    _refused(encode(_ckpt(lineage={"study": "x", "parent": _shared(5)})), "over 100000 values")
    assert time.perf_counter() - t0 < 2.0


def _deep(n: int) -> bytes:
    """A checkpoint-like pickle whose format is a list nested ``n`` deep."""
    nested = b"]" * n + b"a" * (n - 1)
    return b"\x80\x02}" + _u("state_dict") + b"}s" + _u("format") + nested + b"s."


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    _refused(_zip_pickle(_deep(100_000)), "nested over 32 levels")
    # A list that holds itself: refused too (it is as deep as it is walked).
    cyclic = b"\x80\x02}" + _u("state_dict") + b"}s" + _u("format") + b"]q\x00h\x00as."
    _refused(_zip_pickle(cyclic))


def test_deep_nesting_upload_is_a_422_not_a_500(client: TestClient, auth: dict) -> None:
    deep = _zip_pickle(_deep(100_000))
    r = client.post("/v1/models", files={"file": ("m.pt", deep)}, headers=auth)
    assert r.status_code == 422, r.text[:300]
    assert len(r.content) < 2000 and r.json()["error"]["details"][0]["field"] == "file"


def test_messages_never_repr_the_files_values() -> None:
    big = "A" * 1_000_000
    model = _ckpt()["model"] | {"hidden_size": big, "n_features": [big]}
    exc = _refused(encode(_ckpt(model=model)), "hidden_size")
    assert "AAAA" * 100 not in str(exc.details)
    _refused(_zip_pickle(pickle.dumps({"state_dict": {}, "format": big}, protocol=2)), "format")
    _refused(encode(_ckpt(task=big)), "task")
    # A huge integer (repr of it would raise ValueError past 4300 digits).
    _refused(_zip_pickle(pickle.dumps({"state_dict": {}, "format": 10**5000})), "format")
    # A global of a long name, and weight names that are long or not strings.
    raw = b"\x80\x02c" + b"m" * 200_000 + b"\nx\n."
    exc = _refused(_zip_pickle(raw), "never holds")
    state = _ckpt()["state_dict"]
    _refused(encode(_ckpt(state_dict=state | {"w" * 100_000: state["head.bias"]})), "weights")
    _refused(encode(_ckpt(state_dict=state | {1: state["head.bias"]})), "weights")


def test_lineage_is_capped() -> None:
    ok = {"study": "pre", "trial": 0, "frozen_layers": 0, "head": "loaded", "parent": None}
    assert read_checkpoint(encode(_ckpt(lineage=ok)))["lineage"] == ok
    _refused(encode(_ckpt(lineage=ok | {"note": "x" * 100_000})), "lineage")
    # A long chain of fine-tunes still reads, up to the nesting limit.
    chain: dict[str, Any] | None = None
    for i in range(25):
        chain = {"study": f"s{i}", "trial": 0, "head": "loaded", "parent": chain}
    assert read_checkpoint(encode(_ckpt(lineage=chain)))["lineage"] == chain


def test_model_numbers_are_finite() -> None:
    model = _ckpt()["model"]
    for bad in (float("nan"), float("inf"), -0.5):
        _refused(encode(_ckpt(model=model | {"dropout": bad})), "model.dropout")


# ---- 2. the file cannot change the reader -------------------------------------------------------


def _functions() -> dict[str, Any]:
    """What a BUILD could change on the reader's functions and classes."""
    out: dict[str, Any] = {}
    for name, v in vars(lineage).items():
        if isinstance(v, types.FunctionType):
            out[name] = (v.__defaults__, v.__kwdefaults__, dict(v.__dict__), v.__code__)
        elif isinstance(v, type) and v.__module__ == lineage.__name__:
            out[name] = dict(vars(v))
    return out


@pytest.mark.parametrize(
    "glob",
    [
        b"torch._utils\n_rebuild_tensor_v2\n",
        b"torch._utils\n_rebuild_parameter\n",
        b"collections\nOrderedDict\n",
    ],  # fmt: skip
)
def test_build_cannot_modify_an_allowed_global(glob: bytes) -> None:
    before = _functions()
    defaults = b"N}" + _u("__defaults__") + b"(K\x01K\x02K\x03K\x04ts\x86"  # (None, {...})
    attrs = b"}" + _u("evil") + b"K\x01s"  # {'evil': 1}: the object's __dict__
    for state in (defaults, attrs):
        raw = b"\x80\x02}" + _u("state_dict") + b"}s" + _u("format") + b"c" + glob
        raw += state + b"bs."
        _refused(_zip_pickle(raw))
    assert _functions() == before
    assert read_checkpoint(encode(_ckpt()))["model"]["hidden_size"] == 8  # still reads


def test_allowed_globals_are_not_handed_out() -> None:
    raw = b"\x80\x02}" + _u("state_dict") + b"}s" + _u("format") + b"K\x02s" + _u("x")
    raw += b"ctorch._utils\n_rebuild_tensor_v2\ns."
    _refused(_zip_pickle(raw))


# ---- 3. storages no larger than the file --------------------------------------------------------


def test_storage_bomb_is_refused() -> None:
    # head.bias (1 value) viewing a 1M-float storage: torch.save writes the whole storage, a
    # 4 MB record that deflates to a few KB; each torch.load would allocate all of it.
    bomb = _with_weight("head.bias", torch.zeros(1_000_000)[:1])
    small = _rezip(bomb, compression=zipfile.ZIP_DEFLATED)
    assert len(small) < 20_000
    assert decode_model(small)["state_dict"]["head.bias"].untyped_storage().nbytes() == 4_000_000
    _refused(small)
    _refused(bomb, "storage")


def test_tensors_must_be_their_whole_contiguous_storage() -> None:
    _refused(_with_weight("head.bias", torch.zeros(2)[1:]), "offset")
    w = _ckpt()["state_dict"]["lstm.weight_hh_l0"]
    strided = w.t().contiguous().t()
    assert strided.shape == w.shape and not strided.is_contiguous()
    _refused(_with_weight("lstm.weight_hh_l0", strided), "contiguous")


def test_archive_must_be_stored_and_hold_every_storage() -> None:
    blob = encode(_ckpt())
    names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    last = max((n for n in names if "/data/" in n), key=lambda n: int(n.rsplit("/", 1)[1]))
    _refused(_rezip(blob, compression=zipfile.ZIP_DEFLATED), "compressed")
    _refused(_rezip(blob, drop=(last,)), "storage")
    _refused(_rezip(blob, replace={last: b"\0" * 8}), "storage")
    _refused(_rezip(blob, extra=(("archive/data/1", b"\0" * 4),)), "twice")
    _refused(_rezip(blob, extra=(("other/x", b""),)), "outside")


def test_real_checkpoints_still_read() -> None:
    for args in (ModelArgs(3, 8, 2, 0.1, True, 0.0, 2), ModelArgs(1, 4, 1, 0.0, False, 0.0, 1)):
        model = LSTMModel(args)
        ckpt = _ckpt(
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            model=args.to_dict(),
            features=[f"x{i}" for i in range(args.n_features)],
            lineage={"model": "ab" * 16, "name": "m", "parent": {"study": "s", "trial": 1}},
        )
        got = read_checkpoint(encode(ckpt))
        assert got["model"] == args.to_dict() and got["lineage"] == ckpt["lineage"]
        # A module's state_dict as it is (an OrderedDict with _metadata, which pickles with
        # a BUILD), and parameters rather than tensors.
        ckpt["state_dict"] = model.state_dict(keep_vars=True)
        assert read_checkpoint(encode(ckpt))["model"] == args.to_dict()
