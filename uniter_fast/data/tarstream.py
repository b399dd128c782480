"""A tolerant, streaming tar reader that groups members into WebDataset samples.

Python's `tarfile` in stream mode treats a corrupt header in the middle of an archive as the end
of the archive: every sample after it is lost without a word. A loader that must count what it
skips needs to see the damage, step over it and carry on. This reader parses the tar headers
itself (ustar, GNU long names, PAX path records), checks each header's checksum, and on a bad
header reports the damage and resynchronises on the next valid header. Truncation (the stream
ends inside a header or a member) is reported and ends the shard.

    with open("coco-000000.tar", "rb") as f:
        for item in iter_samples(f):
            if isinstance(item, SampleDamage):
                ...  # count it; the shard goes on unless item.fatal
            else:
                item.key, item.members  # {"feat.npy": b"...", ...}

Grouping follows WebDataset: a member `dir/key.ext.more` belongs to sample `dir/key` under the
field `ext.more`; consecutive members with the same key form one sample. A sample whose key was
already seen in the shard, or that repeats a field, is reported as a duplicate and skipped (the
first occurrence is kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["RawSample", "SampleDamage", "iter_samples"]

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file types ('7': contiguous, read as regular)
_SKIP_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no data read
_PAX = (b"x",)
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_ZERO_BLOCK = bytes(BLOCK)
# A member larger than this is treated as damage: no UNITER sample member comes near it, and a
# corrupt size field must not make the reader swallow the rest of the shard as one member.
MAX_MEMBER_BYTES = 1 << 30


@dataclass
class RawSample:
    """One sample: its key, its members' bytes by field, and its ordinal in the shard.

    index counts every sample group the reader met in this shard, good or damaged, from 0:
    resuming at `index` skips exactly the groups before it. damage_after: damage met between
    this sample's members and the next sample's; it may have cost this sample members, so a
    sample that then fails to decode was lost to the damage. damage_before: the same, met just
    before this sample's first member (the `damage_after` of the sample before).
    """

    key: str
    members: dict[str, bytes]
    index: int
    damage_after: str | None = None  # damage met right after its members (maybe its own)
    damage_before: str | None = None  # damage met right before its first member (ditto)


@dataclass
class SampleDamage:
    """Something the reader skipped: a damaged or duplicate sample, or damage to the archive.

    reason: "tar" (damaged or truncated archive) or "duplicate_key".
    key: the sample affected, when known.
    index: the sample ordinal the damage is counted at (as in `RawSample.index`), or None when
        no sample was lost (e.g. junk after the last sample).
    fatal: the shard cannot be read further (truncation).
    """

    reason: str
    detail: str
    key: str | None = None
    index: int | None = None
    fatal: bool = False


def _octal(field_bytes: bytes) -> int:
    # GNU base-256 for large numbers: high bit of the first byte set.
    if field_bytes and field_bytes[0] & 0x80:
        value = field_bytes[0] & 0x7F
        for b in field_bytes[1:]:
            value = (value << 8) | b
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True
    # Some writers sum signed bytes; accept both, as tarfile does.
    high = sum(b for b in block[:148] if b > 127) + sum(b for b in block[156:] if b > 127)
    return stored == unsigned - 2 * high


def _name(block: bytes) -> str:
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar; GNU's "ustar  " keeps times there
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    # Records are "<len> key=value\n".
    path = None
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


class _Stream:
    """Reads exact byte counts from a file object; seeks over data it does not need."""

    def __init__(self, fileobj) -> None:
        self.f = fileobj
        self.offset = 0
        try:
            self.seekable = bool(fileobj.seekable())
        except (AttributeError, OSError):
            self.seekable = False

    def read(self, n: int) -> bytes:
        chunks = []
        left = n
        while left > 0:
            chunk = self.f.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        self.offset += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Skip n bytes; False when the stream ended first."""
        if self.seekable:
            end = self.f.seek(0, 2)
            target = self.offset + n
            if target > end:
                self.f.seek(end)
                self.offset = end
                return False
            self.f.seek(target)
            self.offset = target
            return True
        while n > 0:
            got = len(self.read(min(n, 1 << 20)))
            if got == 0:
                return False
            n -= got
        return True


@dataclass
class _Member:
    name: str
    data: bytes | None  # None when skipped without reading
    damaged_before: str | None = None  # damage met just before this member's header


@dataclass
class _Damage:
    """The archive ends early (`name`: the member being read, None at a header boundary)."""

    detail: str
    name: str | None = None


def _iter_members(stream: _Stream, want_data) -> Iterator[_Member | _Damage]:
    """Regular members in order, with damage reported where met.

    want_data(name) -> bool: whether to read the member's bytes (else they are skipped).
    """
    pending_name: str | None = None
    damage: str | None = None  # set while resynchronising after a bad header
    while True:
        start = stream.offset
        block = stream.read(BLOCK)
        if not block:
            # A whole archive ends with zero blocks: a stream that just stops was cut short.
            yield _Damage(damage or f"archive ends at byte {start} without its end marker")
            return
        if len(block) < BLOCK:
            yield _Damage(damage or f"truncated header at byte {start}")
            return
        if block == _ZERO_BLOCK:
            if damage is not None:
                continue  # zeros inside a damaged member's data: keep looking for a header
            return  # the end of the archive (two zero blocks, then record padding)
        if not _header_ok(block):
            if damage is None:
                damage = f"invalid tar header at byte {start}"
                pending_name = None
            continue  # resynchronise: try the next block as a header
        try:
            size = _octal(block[124:136])
        except ValueError:
            size = -1
        if not 0 <= size <= MAX_MEMBER_BYTES:
            if damage is None:
                damage = f"implausible member size at byte {start}"
                pending_name = None
            continue
        padded = -(-size // BLOCK) * BLOCK
        kind = block[156:157]
        if kind in _PAX or kind == _GNU_LONGNAME:
            data = stream.read(padded)
            if len(data) < size:
                yield _Damage(f"truncated extended header at byte {start}")
                return
            data = data[:size]
            if kind == _GNU_LONGNAME:
                pending_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pending_name = _pax_path(data) or pending_name
            continue
        name = pending_name or _name(block)
        pending_name = None
        if kind == _PAX_GLOBAL or kind in _SKIP_TYPES or kind not in _REGULAR:
            if not stream.skip(size):
                yield _Damage(f"truncated member {name!r} at byte {start}")
                return
            stream.skip(padded - size)  # a cut in the padding alone loses nothing
            continue
        member = _Member(name, None, damaged_before=damage)
        damage = None
        if want_data(name):
            data = stream.read(padded)
            if len(data) < size:
                yield _Damage(f"truncated member {name!r} at byte {start}", name)
                return
            member.data = data[:size]
        elif not stream.skip(size):
            yield _Damage(f"truncated member {name!r} at byte {start}", name)
            return
        else:
            stream.skip(padded - size)
        yield member


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (suffix if dot else "")


def iter_samples(fileobj, *, skip: int = 0) -> Iterator[RawSample | SampleDamage]:
    """Samples of one tar stream, in order, with the damage met along the way.

    skip: sample groups to pass over first without reading their bytes (resuming a shard at
        `RawSample.index == skip`); damage inside them is not reported again.
    """
    grouper = _Grouper(skip)
    for item in _iter_members(_Stream(fileobj), grouper.wants):
        if isinstance(item, _Damage):
            yield from grouper.damage(item)
            return
        else:
            yield from grouper.add(item)
    yield from grouper.finish()


@dataclass
class _Grouper:
    skip: int
    index: int = -1  # ordinal of the group being filled
    key: str | None = None
    members: dict[str, bytes] = field(default_factory=dict)
    problem: tuple[str, str] | None = None  # (reason, detail) that spoils the current group
    damage_before: str | None = None
    seen: set[str] = field(default_factory=set)

    def wants(self, name: str) -> bool:
        key, _ = _split_name(name)
        group = self.index if key == self.key else self.index + 1
        return group >= self.skip

    def add(self, member: _Member) -> Iterator[RawSample | SampleDamage]:
        key, suffix = _split_name(member.name)
        if key != self.key:
            # Damage just before a new key may have cost the previous group its last members:
            # the caller hears of it with that group (a group that still decodes is kept).
            yield from self.finish(damage_after=member.damaged_before)
            self.index += 1
            self.key = key
            self.members = {}
            self.problem = None
            self.damage_before = member.damaged_before
            if key in self.seen:
                self.problem = ("duplicate_key", "appears again later in the shard (first kept)")
            self.seen.add(key)
        elif member.damaged_before is not None and self.problem is None:
            self.problem = ("tar", member.damaged_before)
        if suffix in self.members and self.problem is None:
            self.problem = ("duplicate_key", f"holds field {suffix!r} twice")
        if member.data is not None:
            self.members[suffix] = member.data

    def damage(self, damage: _Damage) -> Iterator[RawSample | SampleDamage]:
        """The archive ends early: nothing after this point can be read."""
        cut_key = _split_name(damage.name)[0] if damage.name is not None else None
        if cut_key is not None and cut_key == self.key:
            # Cut inside one of the current sample's members: that sample is lost.
            key, index = self.key, self.index
            self.key = None
            if index >= self.skip:
                yield SampleDamage("tar", damage.detail, key=key, index=index, fatal=True)
            return
        if self.key is None:
            if cut_key is None:
                yield SampleDamage("tar", damage.detail, fatal=True)
        else:
            # The current sample may be whole or may have lost its last members: decoding
            # tells (`damage_after`).
            yield from self.finish(damage_after=damage.detail)
        if cut_key is not None and self.index + 1 >= self.skip:
            # Cut inside the first member of a new sample.
            yield SampleDamage("tar", damage.detail, key=cut_key, index=self.index + 1, fatal=True)

    def finish(self, damage_after: str | None = None) -> Iterator[RawSample | SampleDamage]:
        if self.key is None:
            if damage_after is not None:
                yield SampleDamage("tar", damage_after)
            return
        key, index = self.key, self.index
        self.key = None
        if index < self.skip:
            return
        if self.problem is not None:
            yield SampleDamage(self.problem[0], self.problem[1], key=key, index=index)
        else:
            yield RawSample(key, self.members, index, damage_after, self.damage_before)
