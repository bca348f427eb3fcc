# The compiled lockstep loop (lockstep.c); tftp.lending wraps it.

def lockstep(
    sock_fd: int,
    file_fd: int,
    inbuf: bytearray,
    block: int,
    size: int,
    blksize: int,
    timeout: float,
    /,
) -> tuple[int, int, int, int, float]: ...
