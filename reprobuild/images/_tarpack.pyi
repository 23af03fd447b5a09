# The compiled helpers of reprobuild/images/_tarpack.c (see its header comment).

from typing import Any

def ustar(name: bytes, linkname: bytes, typeflag: bytes, mode: int, uid: int, gid: int,
          size: int, mtime: int, devmajor: int, devminor: int, /) -> bytes: ...
def append_members(buffer: bytearray, fill: int, members: list[Any], start: int, limit: int,
                   small_file: int, file_source: type, /) -> tuple[int, int, int]: ...
def plan_common(entries: list[Any], start: int, clamp_ns: int, regular: object,
                directory: object, first_of: dict[bytes, bytes], member_type: Any,
                members: list[Any], /) -> int: ...
