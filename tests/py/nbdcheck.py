#!/usr/bin/python3
"""libnbd-driven checks of an NBD server, run by the Rust integration tests.

Run with Debian's interpreter (/usr/bin/python3): the `python3` on PATH may lack
the `nbd` module.

    nbdcheck.py CASE URI [ARGS...]

Every case exits non-zero (with a traceback) on the first failed check and
prints `PASS CASE` as its last line on success; the Rust side asserts on that
line so a script that silently did nothing cannot pass.
"""

import errno
import os
import random
import sys
import time

import nbd

MiB = 1 << 20
STATE_HOLE = 1
STATE_ZERO = 2


def connect(uri, clear_strict=0, meta=True):
    """A fresh handle connected to URI with the given strict bits cleared."""
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    if clear_strict:
        h.set_strict_mode(h.get_strict_mode() & ~clear_strict)
    return h


def expect_err(what, expected, fn):
    """Run fn, which must fail with nbd.Error whose errnum is in `expected`."""
    if isinstance(expected, int):
        expected = (expected,)
    try:
        fn()
    except nbd.Error as e:
        names = [errno.errorcode.get(x, str(x)) for x in expected]
        assert e.errnum in expected, (
            f"{what}: expected {names}, got errnum={e.errnum} "
            f"({errno.errorcode.get(e.errnum)}): {e}"
        )
        print(f"ok {what}: {errno.errorcode.get(e.errnum)}")
        return e.errnum
    raise AssertionError(f"{what}: succeeded, expected an error")


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def check_eq(what, got, want):
    if bytes(got) != bytes(want):
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b) \
            if len(got) == len(want) else -1
        raise AssertionError(
            f"{what}: data mismatch (len got {len(got)} want {len(want)}, "
            f"first differing byte {first})"
        )
    print(f"ok {what}")


def alive(h, what):
    """The connection must still serve a read after a refused request."""
    assert not h.aio_is_dead(), f"{what}: connection died"
    h.pread(1, 0)


def extents(h, length, offset, flags=0):
    """BLOCK_STATUS for base:allocation -> list of (offset, length, flags)."""
    got = []

    def cb(ctx, off, ents, err):
        assert ctx == "base:allocation", ctx
        assert off == offset, (off, offset)
        assert len(ents) >= 2 and len(ents) % 2 == 0, ents
        pos = off
        for i in range(0, len(ents), 2):
            assert ents[i] > 0, f"zero-length extent in {ents}"
            got.append((pos, ents[i], ents[i + 1]))
            pos += ents[i]
        return 0

    h.block_status(length, offset, cb, flags)
    assert got, "no extents"
    if flags & nbd.CMD_FLAG_REQ_ONE:
        assert len(got) == 1, got
        assert got[0][1] <= length, got
    return got


def status_at(h, offset, length=4096):
    (e,) = extents(h, length, offset, nbd.CMD_FLAG_REQ_ONE)
    return e[2]


# ---------------------------------------------------------------- cases


def case_info(uri, size):
    """Size, flags and block sizes through the libnbd API."""
    h = connect(uri)
    size = int(size)
    assert h.get_size() == size, (h.get_size(), size)
    for name in ("can_flush", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero", "can_cache", "can_multi_conn"):
        assert getattr(h, name)(), f"{name} is false"
    assert not h.is_read_only(), "read-only"
    assert h.get_structured_replies_negotiated(), "no structured replies"
    assert h.can_meta_context("base:allocation"), "no base:allocation"
    sizes = [h.get_block_size(k) for k in
             (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    assert sizes == [1, 4096, 32 * MiB], f"block sizes {sizes}"
    print(f"ok size={size} block sizes={sizes}")
    h.shutdown()


def case_data(uri):
    """READ/WRITE/FUA/FLUSH/TRIM/WRITE_ZEROES/FAST_ZERO/CACHE with contents."""
    h = connect(uri)
    size = h.get_size()
    assert size >= 16 * MiB, size

    # WRITE then READ, aligned and unaligned (minimum block size is 1).
    a = pattern(1, 64 * 1024)
    h.pwrite(a, 0)
    check_eq("write/read 64k @0", h.pread(len(a), 0), a)
    b = pattern(2, 1001)
    h.pwrite(b, 4097)
    check_eq("unaligned write/read 1001 @4097", h.pread(1001, 4097), b)
    check_eq("neighbours of unaligned write",
             h.pread(4097, 0) + h.pread(64 * 1024 - 5098, 5098),
             a[:4097] + a[5098:])

    # FUA write.
    c = pattern(3, 128 * 1024)
    h.pwrite(c, 1 * MiB, nbd.CMD_FLAG_FUA)
    check_eq("FUA write", h.pread(len(c), 1 * MiB), c)

    # FLUSH.
    h.flush()
    print("ok flush")

    # Last bytes of the device.
    tail = pattern(4, 512)
    h.pwrite(tail, size - 512)
    check_eq("write/read last 512 bytes", h.pread(512, size - 512), tail)
    check_eq("read last byte", h.pread(1, size - 1), tail[-1:])

    # TRIM: the trimmed range is unspecified, its neighbours must not change.
    base = 2 * MiB
    fill = b"\xcc" * (192 * 1024)
    h.pwrite(fill, base)
    h.trim(64 * 1024, base + 64 * 1024)
    check_eq("before trimmed range", h.pread(64 * 1024, base), fill[:65536])
    check_eq("after trimmed range", h.pread(64 * 1024, base + 128 * 1024),
             fill[:65536])
    h.trim(4096, base, nbd.CMD_FLAG_FUA)
    print("ok trim (+FUA)")

    # WRITE_ZEROES: plain (may punch), NO_HOLE, FUA; neighbours unchanged.
    for i, (flags, what) in enumerate((
            (0, "zero"),
            (nbd.CMD_FLAG_NO_HOLE, "zero NO_HOLE"),
            (nbd.CMD_FLAG_FUA, "zero FUA"),
            (nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA, "zero NO_HOLE|FUA"))):
        off = 4 * MiB + i * MiB
        h.pwrite(b"\xdd" * (3 * 65536), off)
        h.zero(65536, off + 65536, flags)
        check_eq(what, h.pread(65536, off + 65536), bytes(65536))
        check_eq(what + " neighbours",
                 h.pread(65536, off) + h.pread(65536, off + 131072),
                 b"\xdd" * 131072)
    # Unaligned zero inside a block.
    h.pwrite(b"\xee" * 4096, 9 * MiB)
    h.zero(100, 9 * MiB + 1000)
    check_eq("unaligned zero", h.pread(4096, 9 * MiB),
             b"\xee" * 1000 + bytes(100) + b"\xee" * 2996)

    # FAST_ZERO: either done (range reads zero) or refused with ENOTSUP
    # (and then the contents SHOULD be unchanged).
    off = 10 * MiB
    h.pwrite(b"\xab" * 65536, off)
    try:
        h.zero(65536, off, nbd.CMD_FLAG_FAST_ZERO)
        check_eq("FAST_ZERO done", h.pread(65536, off), bytes(65536))
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, f"FAST_ZERO failed with {e}"
        check_eq("FAST_ZERO refused, unchanged", h.pread(65536, off),
                 b"\xab" * 65536)

    # CACHE is a hint: succeeds, contents unchanged.
    h.cache(1 * MiB, 0)
    check_eq("after CACHE", h.pread(len(a), 0), a[:4097] + b + a[5098:])

    # FUA is valid on every command once SEND_FUA is negotiated.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_FLAGS)
    h.pread(512, 0, nbd.CMD_FLAG_FUA)
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(512, 0, nbd.CMD_FLAG_FUA)
    print("ok FUA accepted on READ/FLUSH/CACHE")

    h.flush()
    h.shutdown()


def case_block_status(uri):
    """Fresh sparse disk: hole+zero; after writes: data; extents well formed."""
    h = connect(uri)
    size = h.get_size()
    assert h.can_meta_context("base:allocation")
    ex = extents(h, size, 0)
    assert ex[0][0] == 0
    covered = sum(e[1] for e in ex)
    assert covered >= min(size, 1), ex
    for off in (0, size // 2, size - 4096):
        st = status_at(h, off)
        assert st == STATE_HOLE | STATE_ZERO, \
            f"fresh sparse disk at {off}: status {st}, want hole|zero"
    print("ok fresh disk is hole+zero")

    h.pwrite(pattern(5, 1 * MiB), 0)
    h.pwrite(pattern(6, 64 * 1024), size // 2)
    h.flush()
    for off in (0, 512 * 1024, size // 2):
        st = status_at(h, off)
        assert st & STATE_HOLE == 0 and st & STATE_ZERO == 0, \
            f"written data at {off}: status {st}, want data"
    print("ok written ranges are data")

    # Whole-device map: consecutive, starts at 0, data where written.
    ex = extents(h, size, 0)
    pos = 0
    for off, length, _ in ex:
        assert off == pos, ex
        pos += length
    assert ex[0][2] & STATE_HOLE == 0, ex[:4]
    # A range past the data at the start that was never written is still
    # zero (it may or may not be a hole, depending on the allocation unit).
    st = status_at(h, 8 * MiB)
    assert st & STATE_ZERO or st == 0, st
    check_eq("unwritten range reads zero", h.pread(4096, 8 * MiB),
             bytes(4096))

    # After WRITE_ZEROES the range reads as zero; if it says hole it must
    # also say zero (base:allocation: hole implies the zero bit is accurate
    # for a zero-filled device).
    h.zero(1 * MiB, 0)
    check_eq("zeroed range", h.pread(4096, 0), bytes(4096))
    st = status_at(h, 0)
    print(f"ok status after zero: {st}")
    h.shutdown()


def case_multi_conn(uri):
    """nbdkit tests/test-multi-conn.sh: FUA/FLUSH visible on every handle."""
    hs = [connect(uri) for _ in range(3)]
    for x in hs:
        assert x.can_multi_conn()
    hs[0].pread(4096, 0)  # populate any cache on the reading connection
    hs[1].pwrite(b"Hello ", 0, nbd.CMD_FLAG_FUA)
    check_eq("FUA write on h1 seen on h0", hs[0].pread(6, 0), b"Hello ")
    hs[1].pwrite(b"world.", 6)
    hs[2].flush()
    check_eq("write h1 + flush h2 seen on h0", hs[0].pread(12, 0),
             b"Hello world.")
    # Zero and trim through one handle, seen by another after flush.
    hs[2].pwrite(b"\x11" * 8192, 65536)
    hs[2].flush()
    check_eq("write+flush on h2 seen on h1", hs[1].pread(8192, 65536),
             b"\x11" * 8192)
    hs[1].zero(4096, 65536, nbd.CMD_FLAG_FUA)
    check_eq("zero+FUA on h1 seen on h0", hs[0].pread(8192, 65536),
             bytes(4096) + b"\x11" * 4096)
    # Many interleaved writers: every handle sees every other's data.
    for round_ in range(16):
        for i, x in enumerate(hs):
            x.pwrite(bytes([round_ * 3 + i + 1]) * 512, 1 * MiB + i * 512)
        hs[round_ % 3].flush()
        for x in hs:
            got = x.pread(3 * 512, 1 * MiB)
            want = b"".join(bytes([round_ * 3 + i + 1]) * 512
                            for i in range(3))
            assert bytes(got) == want, f"round {round_}"
    print("ok 16 rounds of cross-handle visibility")
    for x in hs:
        x.shutdown()


def strict_case(uri, name, oversize):
    size = connect(uri).get_size()
    S = nbd
    if name == "read-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("read past end", errno.EINVAL, lambda: h.pread(512, size))
        expect_err("read straddling end", errno.EINVAL,
                   lambda: h.pread(1024, size - 512))
        alive(h, name)
    elif name == "write-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("write past end", errno.ENOSPC,
                   lambda: h.pwrite(bytes(512), size))
        expect_err("write straddling end", errno.ENOSPC,
                   lambda: h.pwrite(b"\x77" * 1024, size - 512))
        alive(h, name)
        check_eq("straddling write changed nothing",
                 h.pread(512, size - 512), bytes(512))
    elif name == "zero-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("zero past end", errno.ENOSPC, lambda: h.zero(512, size))
        expect_err("zero straddling end", errno.ENOSPC,
                   lambda: h.zero(1024, size - 512))
        alive(h, name)
    elif name == "trim-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("trim past end", errno.EINVAL, lambda: h.trim(512, size))
        expect_err("trim straddling end", errno.EINVAL,
                   lambda: h.trim(1024, size - 512))
        alive(h, name)
    elif name == "cache-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("cache past end", errno.EINVAL, lambda: h.cache(512, size))
        alive(h, name)
    elif name == "block-status-past-end":
        h = connect(uri, S.STRICT_BOUNDS)
        expect_err("block status past end", errno.EINVAL,
                   lambda: h.block_status(512, size, lambda *a: 0))
        alive(h, name)
    elif name == "unknown-flags":
        for bit in (1 << 7, 1 << 9, 1 << 15):
            h = connect(uri, S.STRICT_FLAGS)
            expect_err(f"read with unknown flag {bit:#x}", errno.EINVAL,
                       lambda: h.pread(512, 0, bit))
            alive(h, name)
        h = connect(uri, S.STRICT_FLAGS)
        expect_err("write with unknown flag", errno.EINVAL,
                   lambda: h.pwrite(b"\x55" * 512, 0, 1 << 8))
        check_eq("refused write changed nothing", h.pread(512, 0), bytes(512))
    elif name == "misapplied-flags":
        cases = (
            ("NO_HOLE on READ", lambda h: h.pread(512, 0, S.CMD_FLAG_NO_HOLE)),
            ("NO_HOLE on WRITE",
             lambda h: h.pwrite(b"\x55" * 512, 0, S.CMD_FLAG_NO_HOLE)),
            ("REQ_ONE on READ", lambda h: h.pread(512, 0, S.CMD_FLAG_REQ_ONE)),
            ("REQ_ONE on WRITE",
             lambda h: h.pwrite(b"\x55" * 512, 0, S.CMD_FLAG_REQ_ONE)),
            ("FAST_ZERO on TRIM",
             lambda h: h.trim(512, 0, S.CMD_FLAG_FAST_ZERO)),
            ("FAST_ZERO on WRITE",
             lambda h: h.pwrite(b"\x55" * 512, 0, S.CMD_FLAG_FAST_ZERO)),
            ("DF on WRITE", lambda h: h.pwrite(b"\x55" * 512, 0, S.CMD_FLAG_DF)),
        )
        for what, fn in cases:
            h = connect(uri, S.STRICT_FLAGS)
            expect_err(what, errno.EINVAL, lambda: fn(h))
            alive(h, what)
        check_eq("refused writes changed nothing",
                 connect(uri).pread(512, 0), bytes(512))
    elif name == "df":
        chunks = []

        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
            return 0

        h = connect(uri)
        if h.can_df():
            h.pwrite(b"\x42" * 4096, 0)
            got = h.pread_structured(4096, 0, chunk, S.CMD_FLAG_DF)
            check_eq("DF read (DF advertised)", got, b"\x42" * 4096)
            assert len(chunks) == 1, f"DF read in {len(chunks)} chunks"
        else:
            h = connect(uri, S.STRICT_FLAGS | S.STRICT_COMMANDS)
            expect_err("DF read without SEND_DF", errno.EINVAL,
                       lambda: h.pread_structured(4096, 0, chunk,
                                                  S.CMD_FLAG_DF))
            alive(h, name)
    elif name == "zero-size":
        # Unspecified by the protocol: success or an error, never a
        # disconnect. nbdkit: EINVAL, and ENOSPC for WRITE/WRITE_ZEROES.
        for what, fn, allowed in (
                ("READ", lambda h: h.pread(0, 0), (errno.EINVAL,)),
                ("WRITE", lambda h: h.pwrite(b"", 0),
                 (errno.EINVAL, errno.ENOSPC)),
                ("TRIM", lambda h: h.trim(0, 0), (errno.EINVAL,)),
                ("WRITE_ZEROES", lambda h: h.zero(0, 0),
                 (errno.EINVAL, errno.ENOSPC)),
                ("CACHE", lambda h: h.cache(0, 0), (errno.EINVAL,)),
                ("BLOCK_STATUS",
                 lambda h: h.block_status(0, 0, lambda *a: 0),
                 (errno.EINVAL,))):
            h = connect(uri, S.STRICT_ZERO_SIZE)
            try:
                fn(h)
                print(f"ok zero-length {what}: success")
            except nbd.Error as e:
                assert e.errnum in allowed, f"zero-length {what}: {e}"
                print(f"ok zero-length {what}: "
                      f"{errno.errorcode.get(e.errnum)}")
            alive(h, f"zero-length {what}")
    elif name == "unaligned":
        # The server advertises minimum block size 1: unaligned requests
        # with STRICT_ALIGN off must simply work.
        h = connect(uri, S.STRICT_ALIGN)
        assert h.get_block_size(S.SIZE_MINIMUM) == 1
        d = pattern(7, 777)
        h.pwrite(d, 12345)
        check_eq("unaligned read", h.pread(777, 12345), d)
        h.zero(77, 12346)
        check_eq("unaligned zero", h.pread(79, 12345),
                 d[:1] + bytes(77) + d[78:79])
        h.trim(333, 12999)
        h.cache(3, 1)
        check_eq("around unaligned trim", h.pread(100, 12345),
                 d[:1] + bytes(77) + d[78:100])
    elif name == "max-payload":
        h = connect(uri)
        maximum = h.get_block_size(S.SIZE_MAXIMUM)
        assert maximum == 32 * MiB, maximum
        big = pattern(8, maximum)
        h.pwrite(big, 0)
        check_eq("32 MiB write/read", h.pread(maximum, 0), big)
    elif name == "oversize-write":
        h = connect(uri, S.STRICT_MASK)
        n = 33 * MiB
        if oversize == "disconnect":
            try:
                h.pwrite(b"\x99" * n, 0)
                raise AssertionError("33 MiB write succeeded")
            except nbd.Error as e:
                print(f"ok 33 MiB write failed: errnum={e.errnum} "
                      f"({errno.errorcode.get(e.errnum)}): {e}")
                assert e.errnum in (errno.ENOTCONN, errno.ECONNRESET,
                                    errno.EPIPE, errno.ESHUTDOWN), e
            # The connection is dead afterwards.
            try:
                h.pread(512, 0)
                raise AssertionError("connection alive after oversize write")
            except nbd.Error as e:
                print(f"ok later read fails: {e}")
            g = connect(uri)
            data = g.pread(512, 0)
            print(f"ok other connections unaffected ({len(data)} bytes)")
        elif oversize == "accept":
            # nbdkit 1.32 consumes and accepts writes up to 64 MiB.
            h.pwrite(b"\x99" * n, 0)
            check_eq("33 MiB write accepted", h.pread(4096, n - 4096),
                     b"\x99" * 4096)
        else:
            raise AssertionError(f"bad oversize mode {oversize}")
    else:
        raise AssertionError(f"unknown strict case {name}")


def case_opt_mode(uri_noexport, export):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri_noexport)
    assert h.aio_is_negotiating()
    names = []
    n = h.opt_list(lambda name, desc: names.append(name) or 0)
    print(f"ok opt_list: {n} {names}")
    assert export in names, names
    h.set_export_name(export)
    h.opt_info()
    size = h.get_size()
    assert size > 0
    print(f"ok opt_info {export}: size {size}")
    assert h.can_flush() and h.can_fua() and h.can_multi_conn()
    h.set_export_name("")
    h.opt_info()
    assert h.get_size() == size, "empty export name is a different export"
    print("ok opt_info '': same export")
    h.set_export_name("no-such-export")
    try:
        h.opt_info()
        raise AssertionError("opt_info on an unknown export succeeded")
    except nbd.Error as e:
        print(f"ok opt_info unknown export refused: {e}")
    # The connection stays usable after the refusal.
    h.set_export_name(export)
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert "base:allocation" in ctxs, ctxs
    print(f"ok opt_list_meta_context: {ctxs}")
    h.add_meta_context("base:allocation")
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert ctxs == ["base:allocation"], ctxs
    h.clear_meta_contexts()
    h.add_meta_context("nosuchns:foo")
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    assert ctxs == [], f"unknown namespace must be ignored: {ctxs}"
    print("ok unknown meta context namespace ignored")
    h.opt_abort()
    assert h.aio_is_closed() or h.aio_is_dead(), "not closed after opt_abort"
    print("ok opt_abort")

    # opt_info then opt_go on the same handle give the same information.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri_noexport)
    h.set_export_name(export)
    h.opt_info()
    info = (h.get_size(), h.is_read_only(), h.can_trim(), h.can_zero())
    h.opt_go()
    assert (h.get_size(), h.is_read_only(), h.can_trim(),
            h.can_zero()) == info
    assert h.can_meta_context("base:allocation")
    h.pread(512, 0)
    print("ok opt_go after opt_info")
    h.shutdown()

    # Clients that do not use structured replies still work.
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri_noexport)
    h.pwrite(b"simple", 0)
    check_eq("simple replies read", h.pread(6, 0), b"simple")
    h.shutdown()


# ------------------------------------------------ SIGTERM writer / checker

BLOCK = 64 * 1024


def block_payload(gen, idx):
    head = f"blockd-test gen={gen:08d} idx={idx:08d} ".encode()
    body = random.Random(gen * 1_000_003 + idx).randbytes(BLOCK - len(head))
    return head + body


def case_sigterm_writer(uri, region, logpath):
    """Write blocks round-robin over `region` bytes at offset 0, logging each
    acknowledged (gen, idx) to LOG (flushed) before issuing the next write.
    Runs until the connection fails (the server was stopped) or 10 minutes
    or 1,000,000 writes have passed."""
    nblocks = int(region) // BLOCK
    h = connect(uri, meta=False)
    deadline = time.monotonic() + 600
    writes = 0
    with open(logpath, "w", buffering=1) as log:
        log.write("start\n")
        gen = 0
        while writes < 1_000_000 and time.monotonic() < deadline:
            gen += 1
            for idx in range(nblocks):
                log.write(f"send {gen} {idx}\n")
                try:
                    h.pwrite(block_payload(gen, idx), idx * BLOCK)
                except nbd.Error as e:
                    log.write(f"error {e.errnum} {e}\n")
                    print(f"writer stopped by server: {e}")
                    print("PASS sigterm-writer")
                    return
                log.write(f"ack {gen} {idx}\n")
                writes += 1
    raise AssertionError("writer was never stopped by the server")


def case_sigterm_verify(uri, region, logpath):
    nblocks = int(region) // BLOCK
    acked = {}
    pending = None
    acks = 0
    with open(logpath) as log:
        for line in log:
            f = line.split()
            if f and f[0] == "send":
                pending = (int(f[1]), int(f[2]))
            elif f and f[0] == "ack":
                acked[int(f[2])] = int(f[1])
                pending = None
                acks += 1
    assert acks > 0, "the writer never got an acknowledgement"
    h = connect(uri, meta=False)
    ok = 0
    for idx in range(nblocks):
        got = bytes(h.pread(BLOCK, idx * BLOCK))
        want = [acked[idx]] if idx in acked else [0]
        if pending is not None and pending[1] == idx:
            want.append(pending[0])  # the unacknowledged write may be there
        good = False
        for gen in want:
            exp = bytes(BLOCK) if gen == 0 else block_payload(gen, idx)
            if got == exp:
                good = True
        assert good, (f"block {idx}: want gen in {want}, "
                      f"got header {got[:40]!r}")
        ok += 1
    print(f"ok {ok} blocks hold their last acknowledged write "
          f"({acks} acks; in flight at stop: {pending})")


def case_fill(uri, seed, length):
    """Write a deterministic pattern over [0, length) with FUA."""
    h = connect(uri, meta=False)
    data = pattern(int(seed), int(length))
    for off in range(0, len(data), 4 * MiB):
        h.pwrite(data[off:off + 4 * MiB], off)
    h.flush()


def case_verify_fill(uri, seed, length):
    h = connect(uri, meta=False)
    data = pattern(int(seed), int(length))
    for off in range(0, len(data), 4 * MiB):
        check_eq(f"pattern at {off}", h.pread(min(4 * MiB, len(data) - off),
                                              off), data[off:off + 4 * MiB])


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    case, uri, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if case == "info":
        case_info(uri, *args)
    elif case == "data":
        case_data(uri)
    elif case == "block-status":
        case_block_status(uri)
    elif case == "multi-conn":
        case_multi_conn(uri)
    elif case == "strict":
        strict_case(uri, args[0], args[1] if len(args) > 1 else "disconnect")
    elif case == "opt-mode":
        case_opt_mode(uri, *args)
    elif case == "sigterm-writer":
        case_sigterm_writer(uri, *args)
        return
    elif case == "sigterm-verify":
        case_sigterm_verify(uri, *args)
    elif case == "fill":
        case_fill(uri, *args)
    elif case == "verify-fill":
        case_verify_fill(uri, *args)
    else:
        sys.exit(f"unknown case {case}")
    print(f"PASS {case}")


if __name__ == "__main__":
    main()
