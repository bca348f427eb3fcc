"""The one compiled part of pixiebox (everything else is in pyproject.toml): the TFTP lockstep
loop, pixiebox/tftp/lockstep.c, whose header says why it is not Python. It is built against
the stable ABI (abi3, Python 3.11 and later): the wheel build.sh makes with the host's Python
installs on the appliance's newer one."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pixiebox.tftp.lockstep",
            ["agent/pixiebox/tftp/lockstep.c"],
            py_limited_api=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
