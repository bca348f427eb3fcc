"""QEMU machines on a segment: see pixiebox.virtlab.vm (shared with `pixiebox demo`)."""

from pixiebox.virtlab.vm import (  # noqa: F401  (re-exported for the tests)
    ACCEL_ENV,
    QEMU,
    SECBOOT_CODE,
    SECBOOT_VARS,
    VM,
    Firmware,
    Pxe,
    _accel,
    ovmf_files,
    prerequisite_problem,
    start_vm,
)
