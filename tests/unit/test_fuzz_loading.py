"""Property-based fuzzing of the control-file loader (issue 14, item 7).

A small real ControlNet is saved as safetensors, as a zip pickle and as a legacy pickle; Hypothesis mutates the
safetensors header (JSON bytes, header length, dtype / shape / data_offsets), the tensor table (names, shapes,
dtypes, markers of other kinds), and the pickles (opcode bytes, declared storage sizes, the zip's entries), and
feeds every mutant to ``load_control`` (what Load ControlNet calls). Each example must either load or raise
ControlNetError naming the file (never another exception, never torch's "weights_only" advice), finish within a
deadline, and stay within a small multiple of the file's size in Python allocations (tracemalloc) while native
allocations are capped by an address-space limit: a file declaring a 1e12-element tensor must be refused before
anything is allocated. Derandomized (a fixed seed), no example database: the same examples run every time.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import resource
import signal
import struct
import time
import tracemalloc
import zipfile
from datetime import timedelta

import pytest
import torch
from cn_helpers import random_controlnet
from controlstack.controlnet import ControlNetConfig, ControlNetError
from controlstack.controlnet.kinds import load_control
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

pytestmark = pytest.mark.unit

# One level, one ResBlock with a transformer, the middle block: every tensor kind of a ControlNet, ~1 MB.
CONFIG = ControlNetConfig(
    "sd1",
    model_channels=32,
    context_dim=32,
    channel_mult=(1,),
    num_res_blocks=(1,),
    transformer_depth=(1,),
    transformer_depth_middle=1,
)
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=10),  # a loaded 2-core CI machine; a well-behaved example takes < 1.5 s
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# Examples per test, sized so that the four fuzz tests together take about a minute on the 2-core CI machine.
EXAMPLES = {"header": 250, "table": 150, "legacy": 180, "zip": 90}
PYTHON_ALLOC_FACTOR = 4  # tracemalloc peak per example <= this x the file's size (+ the clean load's peak)
NATIVE_HEADROOM = 1 << 30  # address space left to the process during the fuzz tests: a larger request fails
HANG_S = 60  # a hard stop for one example (Hypothesis' deadline only fires after an example returns)

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 256, 4096, 2**16, 2**31 - 1, 2**31, 2**32, 2**53]
INTERESTING += [2**63 - 1, 2**63, 2**64 - 1, 10**12, -1, -8, -(2**63)]
INTS = st.one_of(st.sampled_from(INTERESTING), st.integers(-16, 2**21))
# Names that route a tensor table to another loader or refusal (kinds.py) or break a layout (convert.py).
ODD_NAMES = [
    "difference",
    "lora_controlnet",
    "task_embedding",
    "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight",
    "conv_in.weight",
    "body.0.in_conv.weight",
    "adapter.body.0.resnets.0.block1.weight",
    "controlnet_cond_embedding.conv_in.weight",
    "control_model.zero_convs.0.0.weight",
    "input_blocks.7.0.op.weight",
    "input_blocks.1.1.transformer_blocks.9.attn1.to_q.weight",
    "label_emb.0.0.weight",
    "transformer_layes.0.attn.in_proj_weight",
    "control_add_embedding.linear_1.weight",
    "",
    "\u00e9\x00",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """The clean file bytes: safetensors, zip pickle, legacy pickle (fp16 and fp32 tensors mixed)."""
    cn = random_controlnet(CONFIG, seed=3)
    sd = {
        f"control_model.{k}": v.half() if i % 3 else v.clone()
        for i, (k, v) in enumerate(cn.state_dict().items())
    }
    d = tmp_path_factory.mktemp("fuzz_base")
    save_file(sd, str(d / "cn.safetensors"))
    torch.save(sd, d / "cn_zip.pth")
    torch.save(sd, d / "cn_legacy.pth", _use_new_zipfile_serialization=False)
    out = {k: (d / f).read_bytes() for k, f in (("st", "cn.safetensors"), ("zip", "cn_zip.pth"))}
    out["legacy"] = (d / "cn_legacy.pth").read_bytes()
    out["sd"] = sd
    return out


@pytest.fixture(scope="module")
def guard():
    """Cap the address space (so a huge native allocation fails instead of silently over-committing) and
    record the Python-side peak of a clean load, the allowance's base."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    limit = vm + NATIVE_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    stats = {"examples": 0, "loaded": 0, "refused": 0, "seconds": 0.0, "base_peak": 0}
    try:
        yield stats
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _on_alarm(signum, frame):
    raise TimeoutError(f"one example ran over {HANG_S} s")


def _feed(path, data: bytes, stats: dict, trace: bool = True) -> None:
    """Write ``data`` to ``path``, load it; assert it loads or fails with the one clear error, in bounds.

    ``trace``: measure Python allocations (tracemalloc slows loading ~4x; files written by safetensors itself
    need only the native cap)."""
    path.write_bytes(data)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(HANG_S)
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        load_control(path)
        stats["loaded"] += 1
    except ControlNetError as e:
        stats["refused"] += 1
        msg = str(e)
        assert os.fspath(path) in msg, msg
        assert "weights_only" not in msg, msg
        cause: BaseException | None = e
        while cause is not None:  # a refused huge allocation hidden behind a ControlNetError is a failure too
            assert not isinstance(cause, MemoryError), msg
            assert "can't allocate memory" not in str(cause), msg
            cause = cause.__cause__ or cause.__context__
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        stats["seconds"] += time.perf_counter() - t0
        stats["examples"] += 1
    allowance = stats["base_peak"] + PYTHON_ALLOC_FACTOR * len(data)
    assert peak <= allowance, f"Python allocations peaked at {peak} bytes for a {len(data)}-byte file"


def _base_peak(tmp_path, files, stats) -> None:
    if stats["base_peak"]:
        return
    for kind in ("st", "zip", "legacy"):
        path = tmp_path / f"clean_{kind}.pth"
        path.write_bytes(files[kind])
        tracemalloc.start()
        load_control(path)
        stats["base_peak"] = max(stats["base_peak"], tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


def _mutate_bytes(data, buf: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """1-4 byte flips / inserts / deletes / truncations inside buf[lo:hi]."""
    b = bytearray(buf)
    hi = len(b) if hi is None else hi
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        if hi <= lo:
            break
        at = data.draw(st.integers(lo, hi - 1), label="at")
        op = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]), label="op")
        if op == "set":
            b[at] = data.draw(st.integers(0, 255), label="byte")
        elif op == "insert":
            b[at:at] = data.draw(st.binary(min_size=1, max_size=9), label="bytes")
        elif op == "delete":
            del b[at : at + data.draw(st.integers(1, 16), label="n")]
        else:
            del b[at:]
        hi = min(hi, len(b))
    return bytes(b)


# ---- safetensors -----------------------------------------------------------------------------------------


def _split_st(buf: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", buf[:8])[0]
    return json.loads(buf[8 : 8 + n]), buf[8 + n :]


@settings(max_examples=EXAMPLES["header"], **SETTINGS)
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path_factory, files, guard, data):
    """Mutated JSON header fields, header bytes and header length of a real safetensors file."""
    tmp = tmp_path_factory.getbasetemp()
    _base_peak(tmp, files, guard)
    header, body = _split_st(files["st"])
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 4), label="field edits")):
        key = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(
            st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "copy", "meta"])
        )
        entry = header.get(key)
        if entry is None:
            continue
        if field == "dtype":
            entry["dtype"] = data.draw(
                st.sampled_from(
                    ["F16", "F32", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX", "", 7, None]
                )
            )
        elif field == "shape":
            entry["shape"] = data.draw(
                st.one_of(st.lists(INTS, max_size=5), st.sampled_from([None, "3", [1.5], [[2]]])),
                label="shape",
            )
        elif field == "data_offsets":
            entry["data_offsets"] = data.draw(
                st.one_of(st.lists(INTS, min_size=2, max_size=2), st.lists(INTS, max_size=3)), label="offsets"
            )
        elif field == "drop":
            del header[key]
        elif field == "rename":
            header[data.draw(st.sampled_from(ODD_NAMES), label="name")] = header.pop(key)
        elif field == "copy":  # a second name over the same bytes
            header[data.draw(st.sampled_from(ODD_NAMES), label="name")] = dict(entry)
        else:
            header["__metadata__"] = data.draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x", None]))
    text = json.dumps(header).encode()
    if data.draw(st.booleans(), label="flip header bytes"):
        text = _mutate_bytes(data, text)
    length = len(text)
    if data.draw(st.integers(0, 3), label="lie about length") == 0:
        length = data.draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, len(text) + 64)))
    prefix = struct.pack("<Q", length % 2**64)
    if data.draw(st.booleans(), label="truncate body"):
        body = body[: data.draw(st.integers(0, len(body)), label="keep")]
    _feed(tmp / "fuzz_header.safetensors", prefix + text + body, guard)


@settings(max_examples=EXAMPLES["table"], **SETTINGS)
@given(data=st.data())
def test_fuzz_tensor_table(tmp_path_factory, files, guard, data):
    """Well-formed safetensors files with a mutated tensor table: names, shapes (incl. zero-size tensors with
    huge dims), dtypes, markers of other kinds. Reaches the layout, config and model code behind the reader."""
    tmp = tmp_path_factory.getbasetemp()
    _base_peak(tmp, files, guard)
    sd = dict(files["sd"])
    names = sorted(sd)
    for _ in range(data.draw(st.integers(1, 5), label="table edits")):
        key = data.draw(st.sampled_from(names), label="tensor")
        op = data.draw(st.sampled_from(["drop", "rename", "reshape", "retype", "add", "strip_prefix"]))
        if key not in sd:
            continue
        if op == "drop":
            del sd[key]
        elif op == "rename":
            sd[data.draw(st.sampled_from(ODD_NAMES + names), label="name")] = sd.pop(key)
        elif op == "reshape":
            dims = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 31, 32, 64]), max_size=4))
            if data.draw(st.booleans(), label="huge dim"):  # a zero-size tensor may claim any other dim
                dims[data.draw(st.integers(0, len(dims)), label="at") : 0] = [10**12, 0]
            sd[key] = torch.zeros(dims, dtype=sd[key].dtype) if _numel(dims) <= 1 << 16 else sd[key]
        elif op == "retype":
            dt = data.draw(
                st.sampled_from([torch.int8, torch.int64, torch.bool, torch.float64, torch.bfloat16])
            )
            sd[key] = sd[key].to(dt)
        elif op == "add":
            sd[data.draw(st.sampled_from(ODD_NAMES), label="name")] = torch.zeros(
                data.draw(st.lists(st.integers(0, 8), max_size=3), label="shape")
            )
        else:
            sd = {k.removeprefix("control_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k}  # safetensors refuses an empty name itself, not our loader
    path = tmp / "fuzz_table.safetensors"
    save_file(sd, str(path))
    _feed(path, path.read_bytes(), guard, trace=False)


def _numel(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# ---- pickles ---------------------------------------------------------------------------------------------


def _storage_numels(pkl: bytes, start: int = 0) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the numel ints in the storage persistent ids of the pickle at ``start``:
    the int that follows each 'cpu' location string."""
    out, after_cpu = [], False
    for op, arg, pos in pickletools.genops(io.BytesIO(pkl[start:])):
        if after_cpu and op.name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"):
            out.append(pos)
        if op.name not in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            after_cpu = arg == "cpu"
    ends = []
    for pos in out:
        op = pickletools.code2op[chr(pkl[start + pos])]
        size = {"BININT": 4, "BININT1": 1, "BININT2": 2}.get(op.name)
        if size is None:  # LONG1: length byte, then that many bytes
            size = 1 + pkl[start + pos + 1]
        ends.append((start + pos, start + pos + 1 + size))
    return ends


def _lie_numel(pkl: bytes, ranges: list[tuple[int, int]], which: int, numel: int) -> bytes:
    """Replace one declared numel by ``numel`` (as LONG1): the storage bytes no longer match the data."""
    a, b = ranges[which % len(ranges)]
    raw = numel.to_bytes((numel.bit_length() + 8) // 8 or 1, "little", signed=True)
    return pkl[:a] + b"\x8a" + bytes([len(raw)]) + raw + pkl[b:]


def _legacy_pickle_end(buf: bytes) -> int:
    """End of the 5 pickles of a legacy file (the raw storages follow)."""
    f = io.BytesIO(buf)
    for _ in range(5):
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                break
    return f.tell()


NUMEL_LIES = st.sampled_from([0, 1, 10**6, 10**9, 10**12, 2**40, 2**62, -1])


@settings(max_examples=EXAMPLES["legacy"], **SETTINGS)
@given(data=st.data())
def test_fuzz_legacy_pickle(tmp_path_factory, files, guard, data):
    """Legacy (non-zip) torch pickles: mutated opcode bytes, lying storage sizes, truncations."""
    tmp = tmp_path_factory.getbasetemp()
    _base_peak(tmp, files, guard)
    buf = files["legacy"]
    end = _legacy_pickle_end(buf)
    if data.draw(st.booleans(), label="lie about a storage size"):
        buf = _lie_numel(buf, _storage_numels(buf, _pickle_start(buf, 3)), data.draw(st.integers(0, 200)),
                         data.draw(NUMEL_LIES))  # fmt: skip
    if data.draw(st.integers(0, 3), label="edit opcodes") > 0:
        buf = _mutate_bytes(data, buf, 0, min(end, len(buf)))
    if data.draw(st.integers(0, 4), label="edit anywhere") == 0:
        buf = _mutate_bytes(data, buf)
    _feed(tmp / "fuzz_legacy.pth", buf, guard)


def _pickle_start(buf: bytes, index: int) -> int:
    f = io.BytesIO(buf)
    for _ in range(index):
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                break
    return f.tell()


@settings(max_examples=EXAMPLES["zip"], **SETTINGS)
@given(data=st.data())
def test_fuzz_zip_pickle(tmp_path_factory, files, guard, data):
    """Zip torch pickles: mutated data.pkl (re-zipped with valid CRCs, stored or deflated), lying storage
    sizes, entries that claim more than the file holds, raw byte edits of the archive."""
    tmp = tmp_path_factory.getbasetemp()
    _base_peak(tmp, files, guard)
    with zipfile.ZipFile(io.BytesIO(files["zip"])) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    pkl_name = next(n for n in entries if n.endswith("data.pkl"))
    pkl = entries[pkl_name]
    if data.draw(st.booleans(), label="lie about a storage size"):
        pkl = _lie_numel(pkl, _storage_numels(pkl), data.draw(st.integers(0, 200)), data.draw(NUMEL_LIES))
    if data.draw(st.booleans(), label="edit data.pkl"):
        pkl = _mutate_bytes(data, pkl)
    entries[pkl_name] = pkl
    if data.draw(st.integers(0, 5), label="drop an entry") == 0:
        entries.pop(data.draw(st.sampled_from(sorted(entries))))
    out = io.BytesIO()
    method = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(out, "w", method) as z:
        for n, b in entries.items():
            z.writestr(n, b)
    buf = out.getvalue()
    if data.draw(st.integers(0, 3), label="edit the archive") == 0:
        buf = _mutate_bytes(data, buf)
    _feed(tmp / "fuzz_zip.pth", buf, guard)


def test_fuzz_summary(guard):
    """Reports how many examples ran and how long they took (runs after the fuzz tests in file order)."""
    if guard["examples"]:
        print(
            f"\nfuzz: {guard['examples']} examples ({guard['loaded']} loaded, {guard['refused']} refused) "
            f"in {guard['seconds']:.1f} s of loading"
        )


# ---- the named cases the fuzzer must keep covering -------------------------------------------------------


def test_huge_declared_sizes_are_refused_before_allocating(tmp_path, files, guard):
    """A header / pickle declaring a 1e12-element tensor is refused from its sizes, not by a failed malloc."""
    header, body = _split_st(files["st"])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["shape"] = [10**6, 10**6]
    text = json.dumps(header).encode()
    _feed(tmp_path / "huge.safetensors", struct.pack("<Q", len(text)) + text + body, guard)

    legacy = files["legacy"]
    lied = _lie_numel(legacy, _storage_numels(legacy, _pickle_start(legacy, 3)), 0, 10**12)
    with pytest.raises(ControlNetError, match=r"declares \d+ bytes of tensor data but the file has"):
        load_control(_write(tmp_path / "huge_legacy.pth", lied))

    with zipfile.ZipFile(io.BytesIO(files["zip"])) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = _lie_numel(entries[name], _storage_numels(entries[name]), 0, 10**12)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    _feed(tmp_path / "huge_zip.pth", out.getvalue(), guard)


def test_zip_bomb_is_refused(tmp_path):
    """A deflated entry that would inflate far beyond the file is refused before it is inflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(64 << 20))  # 64 MiB of zeros -> ~64 KiB deflated
    with pytest.raises(ControlNetError, match=r"zip entries declare \d+ bytes, more than 4 x"):
        load_control(_write(tmp_path / "bomb.pth", out.getvalue()))


def test_deflated_zip_loads_the_right_numbers(tmp_path, files):
    """torch maps a zip's bytes as weights without inflating them: a deflated checkpoint must not be mmapped."""
    with zipfile.ZipFile(io.BytesIO(files["zip"])) as zi:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zo:
            for i in zi.infolist():
                zo.writestr(i.filename, zi.read(i))
    cn = load_control(_write(tmp_path / "deflated.pth", out.getvalue()))
    sd = files["sd"]
    for k, v in cn.state_dict().items():
        assert torch.equal(v, sd[f"control_model.{k}"].to(v.dtype)), k


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
