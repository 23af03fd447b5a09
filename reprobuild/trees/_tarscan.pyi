# The compiled scan of reprobuild/trees/_tarscan.c (see its header comment).

def scan(buffer: bytes, buffer_start: int, offset: int, file_size: int, /) -> tuple[
        list[tuple[bytes, bool, int, int, int, int, int, int]], int]: ...
