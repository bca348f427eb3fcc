"""Tests for pixiebox.config.labfile: enrolling and changing machines in lab.toml without losing a
byte of what the user wrote.

Every successful edit is checked strictly against the original bytes: an enrollment must be
exactly one insertion (original == new[:k] + new[k + len(inserted):]), a change exactly the
replaced value. Every refusal must leave the file as it was: same bytes, same mtime, no temp
file beside it.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import stat
import tomllib
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cleanenv import drop_pixiebox_variables
from pixiebox.config import LabConfig, Problem, check_config, format_loc, labfile
from pixiebox.config.labfile import (
    EnrollError,
    enroll,
    next_free_ip,
    next_free_name,
    update_machine,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "lab.toml"
LOCK = ".lab.toml.lock"

NETWORK = """\
[network]
interface = "lo"
server_ip = "192.168.1.64"
subnet = "192.168.1.0/24"
gateway = "192.168.1.254"
pool = "192.168.1.200-192.168.1.250"
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_pixiebox_variables(monkeypatch)


# --- helpers -------------------------------------------------------------------------------


def lab(tmp_path: Path, content: bytes | str | None = None) -> Path:
    """lab.toml in tmp_path: the shipped example, or the given text written byte for byte."""
    path = tmp_path / "lab.toml"
    if content is None:
        content = EXAMPLE.read_bytes()
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def insertion(original: bytes, new: bytes) -> tuple[int, bytes]:
    """(k, inserted) such that new is original with `inserted` put in at k; fails unless the
    new file is exactly the original plus one inserted run of bytes."""
    assert len(new) > len(original), "nothing was inserted"
    size = len(new) - len(original)
    k = 0
    while k < len(original) and original[k] == new[k]:
        k += 1
    inserted = new[k : k + size]
    assert new[:k] + new[k + size :] == original, "the original bytes did not survive"
    return k, inserted


def inserted_at(original: bytes, new: bytes, k: int) -> bytes:
    """The bytes inserted at exactly k (an insertion is ambiguous when it starts with the byte
    that follows it: "\\n…" before "\\n" — so say where it must be)."""
    size = len(new) - len(original)
    assert size > 0
    assert new[:k] == original[:k] and new[k + size :] == original[k:]
    return new[k : k + size]


def today_comments() -> set[bytes]:
    """The dated comment line, for today (and tomorrow, should the test run over midnight)."""
    today = datetime.date.today()
    days = {today, today + datetime.timedelta(days=1)}
    return {f"# enrolled by pixiebox on {day.isoformat()}".encode() for day in days}


def valid(path: Path) -> LabConfig:
    config, problems = check_config(path)
    assert problems == [], problems
    assert config is not None
    return config


def listing(path: Path) -> set[str]:
    return {entry.name for entry in path.parent.iterdir()}


def shown(problems: list[Problem]) -> list[tuple[str, str]]:
    return [(format_loc(p.loc), p.message) for p in problems]


class Unchanged:
    """Snapshot of lab.toml; `assert_same()` checks bytes, mtime and that no temp file is left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.content = path.read_bytes()
        self.mtime = path.stat().st_mtime_ns
        self.inode = path.stat().st_ino

    def assert_same(self) -> None:
        assert self.path.read_bytes() == self.content
        assert self.path.stat().st_mtime_ns == self.mtime
        assert self.path.stat().st_ino == self.inode
        assert listing(self.path) <= {self.path.name, LOCK}, listing(self.path)


# --- 1. enrolling into the shipped example ---------------------------------------------------


def test_enroll_into_example_is_exactly_one_insertion(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_bytes()
    done = enroll(path, "AA-BB-CC-DD-EE-01", "web1", "192.168.1.40", power={"driver": "wol"})
    new = path.read_bytes()
    k, inserted = insertion(original, new)
    # The machines are last in the example: the block goes at the very end.
    assert k == len(original)
    assert inserted in {
        b"\n"
        + comment
        + b'\n[[machines]]\nname = "web1"\nmac = "aa:bb:cc:dd:ee:01"\nip = "192.168.1.40"\n'
        b'power = { driver = "wol" }\n'
        for comment in today_comments()
    }
    config = valid(path)
    assert [m.name for m in config.machines] == ["c1", "c2", "web1"]
    added = config.machines[-1]
    assert (added.mac, added.ip, added.power and added.power.driver) == (
        "aa:bb:cc:dd:ee:01",
        IPv4Address("192.168.1.40"),
        "wol",
    )
    line = original.count(b"\n") + 3  # the blank line, the comment, the header
    assert done == labfile.Enrollment(
        "web1", "aa:bb:cc:dd:ee:01", IPv4Address("192.168.1.40"), line
    )
    assert new.decode().splitlines()[done.line - 1] == "[[machines]]"
    assert listing(path) == {"lab.toml", LOCK}


def test_enroll_defaults_to_next_free_name_and_no_ip(tmp_path: Path) -> None:
    path = lab(tmp_path)
    first = enroll(path, "aabb.ccdd.ee01")
    second = enroll(path, "aa:bb:cc:dd:ee:02")
    assert (first.name, first.ip, second.name) == ("node1", None, "node2")
    config = valid(path)
    assert [(m.name, m.mac, m.ip) for m in config.machines[2:]] == [
        ("node1", "aa:bb:cc:dd:ee:01", None),
        ("node2", "aa:bb:cc:dd:ee:02", None),
    ]
    # Each enrollment was an insertion into the file as the one before left it.
    text = path.read_text()
    assert text.startswith(EXAMPLE.read_text())
    assert text.count("# enrolled by pixiebox on ") == 2
    assert "\nip" not in text.split('name = "node1"')[1]


def test_enroll_with_image_and_name_in_capitals(tmp_path: Path) -> None:
    path = lab(tmp_path)
    done = enroll(path, "aa:bb:cc:dd:ee:01", " Web1 ", image="osie", power={"driver": "ssh"})
    assert done.name == "web1"
    assert path.read_text().endswith(
        'name = "web1"\nmac = "aa:bb:cc:dd:ee:01"\nimage = "osie"\npower = { driver = "ssh" }\n'
    )
    assert valid(path).machines[-1].image == "osie"


# --- 2. refused: nothing written, the messages of `pixiebox check` ----------------------------


def _manual(original: str, name: str, mac: str, ip: str | None) -> str:
    """The file a person would write by hand for the same enrollment."""
    block = f'\n[[machines]]\nname = "{name}"\nmac = "{mac}"\n'
    return original + block + (f'ip = "{ip}"\n' if ip else "")


@pytest.mark.parametrize(
    ("mac", "name", "ip", "key", "message"),
    [
        pytest.param(
            "F4-4D-30-64-7A-3A",
            "c9",
            None,
            "machines[2].mac",
            "MAC f4:4d:30:64:7a:3a is already used by machine 'c1' (machines[0])",
            id="duplicate-mac-other-spelling",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c2",
            None,
            "machines[2].name",
            "name c2 is already used by machine 'c2' (machines[1])",
            id="duplicate-name",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c9",
            "192.168.1.31",
            "machines[2].ip",
            "IP 192.168.1.31 is already used by machine 'c1' (machines[0])",
            id="duplicate-ip",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c9",
            "10.0.0.5",
            "machines[2].ip",
            "10.0.0.5 (machine 'c9') is outside the subnet 192.168.1.0/24",
            id="ip-outside-subnet",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c9",
            "192.168.1.210",
            "network.pool",
            "the pool 192.168.1.200-192.168.1.250 overlaps the reservation of machine 'c9' "
            "(192.168.1.210, machines[2])",
            id="ip-in-pool",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c9",
            "192.168.1.254",
            "machines[2].ip",
            "192.168.1.254 (machine 'c9') is the gateway address",
            id="ip-is-gateway",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "web 1",
            None,
            "machines[2].name",
            "'web 1' is not a valid machine name",
            id="bad-name",
        ),
        pytest.param(
            "aa:bb:cc:dd:ee:01",
            "c9",
            "192.168.1.999",
            "machines[2].ip",
            None,
            id="bad-ip",
        ),
    ],
)
def test_refused_with_check_messages_and_nothing_written(
    tmp_path: Path, mac: str, name: str, ip: str | None, key: str, message: str | None
) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, mac, name, ip)
    before.assert_same()
    problems = caught.value.problems
    assert [format_loc(p.loc) for p in problems] == [key]
    if message is not None:
        assert problems[0].message == message
    assert problems[0].hint
    # Exactly what `pixiebox check` says about the same machine written by hand (the line
    # aside: the new block is not in the file, so its problems have none).
    manual = tmp_path / "manual" / "lab.toml"
    manual.parent.mkdir()
    manual.write_text(_manual(EXAMPLE.read_text(), name.strip().lower(), mac, ip))
    _, expected = check_config(manual)
    assert [(p.loc, p.message, p.hint) for p in problems] == [
        (p.loc, p.message, p.hint) for p in expected
    ]
    assert str(path) in str(caught.value)


def test_refusal_lines_point_into_the_file_as_it_is(tmp_path: Path) -> None:
    path = lab(tmp_path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01", "c9", "192.168.1.210")
    [problem] = caught.value.problems
    pool_line = path.read_text().splitlines().index('pool = "192.168.1.200-192.168.1.250"') + 1
    assert problem.line == pool_line
    with pytest.raises(EnrollError) as caught:
        enroll(path, "f4:4d:30:64:7a:3a", "c9")
    [problem] = caught.value.problems
    assert problem.line is None  # the new block: not a line of the file


def test_bad_mac_refused_before_anything(tmp_path: Path) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "zz:zz:zz:zz:zz:zz", "c9")
    before.assert_same()
    [problem] = caught.value.problems
    assert format_loc(problem.loc) == "machines[2].mac"
    assert problem.message == "'zz:zz:zz:zz:zz:zz' is not a MAC address"
    assert "f4:4d:30:64:7a:3a" in problem.hint


MULTICAST = "is a multicast address (its first octet is odd)"


@pytest.mark.parametrize(
    ("spelling", "mac", "why"),
    [
        ("01:00:5E:00:00:01", "01:00:5e:00:00:01", MULTICAST),
        ("33-33-00-00-00-01", "33:33:00:00:00:01", MULTICAST),
        ("ffff.ffff.ffff", "ff:ff:ff:ff:ff:ff", "is the broadcast address"),
        ("00:00:00:00:00:00", "00:00:00:00:00:00", "is the all-zero address"),
    ],
)
def test_group_and_zero_macs_are_refused_and_nothing_written(
    tmp_path: Path, spelling: str, mac: str, why: str
) -> None:
    # No network card has one: enrolling it would make a machine that stands for every machine
    # on the segment (or none).
    path = lab(tmp_path)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, spelling, "c9")
    before.assert_same()
    [problem] = caught.value.problems
    assert format_loc(problem.loc) == "machines[2].mac"
    assert problem.message == (
        f"{mac} {why}: no network card has it; check the MAC on the machine's label or in "
        "`pixiebox machines`"
    )
    assert "six hex pairs" not in problem.hint  # the spelling is fine; the address is not
    # Nor can an enrolled machine be given one.
    with pytest.raises(EnrollError) as caught:
        update_machine(path, "c2", mac=spelling)
    before.assert_same()
    assert shown(caught.value.problems) == [("machines[1].mac", problem.message)]


def test_file_with_errors_is_not_touched(tmp_path: Path) -> None:
    path = lab(tmp_path, NETWORK + 'dhcp_mode = "fulll"\n')
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01")
    before.assert_same()
    keys = [format_loc(p.loc) for p in caught.value.problems]
    assert keys == ["network.dhcp_mode", "(file)"]
    assert "has errors already" in caught.value.problems[-1].message


ARCH_TABLES = """
[[machines]]
name = "tk1"
mac = "00:04:4b:aa:aa:01"

[images.osie]
kernel = "osie/vmlinuz"

[images.osie.arch.armhf]   # the Jetson TK1s
kernel = "osie-armhf/vmlinuz"
fdtdir = "osie-armhf/dtbs"
"""


def test_enrolling_keeps_the_architecture_tables(tmp_path: Path) -> None:
    text = NETWORK + ARCH_TABLES
    path = lab(tmp_path, text)
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    _, inserted = insertion(text.encode(), path.read_bytes())
    assert b'name = "web1"' in inserted and b"images" not in inserted
    # The new block goes after the last machine, before the image and its tables.
    assert path.read_text().endswith(text[text.index("\n[images.osie]") :])
    config = valid(path)
    assert [m.name for m in config.machines] == ["tk1", "web1"]
    assert config.images["osie"].arch["armhf"].fdtdir == "osie-armhf/dtbs"


def test_a_bad_architecture_key_refuses_an_enrollment_naming_its_line(tmp_path: Path) -> None:
    text = NETWORK + ARCH_TABLES.replace("arch.armhf", "arch.armv7")
    path = lab(tmp_path, text)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01")
    before.assert_same()
    problem = caught.value.problems[0]
    assert format_loc(problem.loc) == "images.osie.arch.armv7"
    header = "[images.osie.arch.armv7]   # the Jetson TK1s"
    assert problem.line == text.splitlines().index(header) + 1
    assert problem.hint.startswith("did you mean 'armhf'?")
    assert "has errors already" in caught.value.problems[-1].message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EnrollError) as caught:
        enroll(tmp_path / "lab.toml", "aa:bb:cc:dd:ee:01")
    assert "no such file" in caught.value.problems[0].message
    assert not (tmp_path / "lab.toml").exists()


# --- 3. next_free_name / next_free_ip -------------------------------------------------------


def config_of(tmp_path: Path, text: str) -> LabConfig:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return valid(path)


def machines(*specs: tuple[str, str | None]) -> str:
    return "".join(
        f'\n[[machines]]\nname = "{name}"\nmac = "aa:bb:cc:dd:ee:{i:02x}"\n'
        + (f'ip = "{ip}"\n' if ip else "")
        for i, (name, ip) in enumerate(specs)
    )


@pytest.mark.parametrize(
    ("names", "prefix", "expected"),
    [
        ((), "node", "node1"),
        (("c1", "c2"), "node", "node1"),
        (("node1", "node2"), "node", "node3"),
        (("node1", "node3"), "node", "node2"),
        (("node2",), "node", "node1"),
        (("pi1", "node1"), "pi", "pi2"),
    ],
)
def test_next_free_name(tmp_path: Path, names: tuple[str, ...], prefix: str, expected: str) -> None:
    config = config_of(tmp_path, NETWORK + machines(*((n, None) for n in names)))
    assert next_free_name(config, prefix) == expected


SMALL = """\
[network]
interface = "lo"
subnet = "10.0.0.0/29"
gateway = "10.0.0.1"
server_ip = "10.0.0.3"
pool = "10.0.0.5-10.0.0.5"
"""  # hosts .1-.6: gateway .1, server .3, pool .5 → .2, .4, .6 for machines


def test_next_free_ip_skips_gateway_server_pool_machines_and_leases(tmp_path: Path) -> None:
    config = config_of(tmp_path, SMALL)
    assert next_free_ip(config) == IPv4Address("10.0.0.2")
    config = config_of(tmp_path, SMALL + machines(("a", "10.0.0.2")))
    assert next_free_ip(config) == IPv4Address("10.0.0.4")
    assert next_free_ip(config, [IPv4Address("10.0.0.4")]) == IPv4Address("10.0.0.6")
    # Full: never the network (.0) or broadcast (.7) address.
    assert next_free_ip(config, [IPv4Address("10.0.0.4"), IPv4Address("10.0.0.6")]) is None
    config = config_of(tmp_path, SMALL + machines(("a", "10.0.0.2"), ("b", "10.0.0.4")))
    assert next_free_ip(config, iter([IPv4Address("10.0.0.6")])) is None


def test_next_free_ip_in_the_example(tmp_path: Path) -> None:
    config = valid(EXAMPLE)
    assert next_free_ip(config) == IPv4Address("192.168.1.1")
    leases = [IPv4Address(f"192.168.1.{host}") for host in range(1, 31)]
    assert next_free_ip(config, leases) == IPv4Address("192.168.1.33")  # .31, .32: c1, c2
    leases = [IPv4Address(f"192.168.1.{host}") for host in range(1, 200)]
    assert next_free_ip(config, leases) == IPv4Address("192.168.1.251")  # after the pool
    leases += [IPv4Address("192.168.1.251"), IPv4Address("192.168.1.252")]
    assert next_free_ip(config, leases) == IPv4Address("192.168.1.253")
    leases += [IPv4Address("192.168.1.253")]
    assert next_free_ip(config, leases) is None  # .254 gateway, .255 broadcast


def test_next_free_ip_without_subnet(tmp_path: Path) -> None:
    assert next_free_ip(config_of(tmp_path, '[network]\ninterface = "lo"\n')) is None


def test_next_free_ip_result_can_be_enrolled(tmp_path: Path) -> None:
    path = lab(tmp_path)
    address = next_free_ip(valid(path), [IPv4Address("192.168.1.1")])
    assert address == IPv4Address("192.168.1.2")
    done = enroll(path, "aa:bb:cc:dd:ee:01", ip=str(address))
    assert done.ip == address
    assert next_free_ip(valid(path), [IPv4Address("192.168.1.1")]) == IPv4Address("192.168.1.3")


# --- 4. concurrency ------------------------------------------------------------------------


def _enroll_worker(path: str, number: int, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    enroll(Path(path), f"aa:bb:cc:dd:ee:{number:02x}")


def test_twenty_enrollments_at_once_all_land(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_bytes()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(20)
    workers = [
        context.Process(target=_enroll_worker, args=(str(path), number, barrier))
        for number in range(20)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * 20
    config = valid(path)
    added = config.machines[2:]
    assert sorted(m.mac for m in added) == [f"aa:bb:cc:dd:ee:{n:02x}" for n in range(20)]
    assert sorted(m.name for m in added) == sorted(f"node{n}" for n in range(1, 21))
    assert path.read_bytes().startswith(original)
    assert path.read_text().count("# enrolled by pixiebox on ") == 20
    assert listing(path) == {"lab.toml", LOCK}


# --- 5. crash safety -----------------------------------------------------------------------


def test_failure_before_rename_leaves_original_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)
    written: list[str] = []

    def failing_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        # The candidate was complete and synced when the rename was attempted.
        written.append(Path(source).read_text())
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    before.assert_same()
    assert "cannot write" in caught.value.problems[0].message
    assert "Input/output error" in caught.value.problems[0].message
    assert len(written) == 1 and 'name = "web1"' in written[0]


def test_interrupted_before_rename_leaves_original_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)

    def interrupted(source: object, target: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        update_machine(path, "c1", ip="192.168.1.41")
    before.assert_same()


def test_failed_fsync_leaves_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(EnrollError):
        enroll(path, "aa:bb:cc:dd:ee:01")
    before.assert_same()


def test_mode_and_owner_kept(tmp_path: Path) -> None:
    path = lab(tmp_path)
    path.chmod(0o640)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        os.chown(path, *owner)
    enroll(path, "aa:bb:cc:dd:ee:01")
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == owner


def test_symlinked_file_is_written_through(tmp_path: Path) -> None:
    real = lab(tmp_path)
    link = tmp_path / "link" / "lab.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    enroll(link, "aa:bb:cc:dd:ee:01")
    assert link.is_symlink()
    assert "aa:bb:cc:dd:ee:01" in real.read_text()


def test_file_changed_meanwhile_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone saving lab.toml in an editor between our read and our rename wins."""
    path = lab(tmp_path)
    real_check = check_config
    calls = 0

    def check_then_edit(file: Path) -> tuple[LabConfig | None, list[Problem]]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the candidate is being checked: the user saves meanwhile
            path.write_text(path.read_text() + "# edited by hand\n")
        return real_check(file)

    monkeypatch.setattr(labfile, "check_config", check_then_edit)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01")
    assert "changed by someone else" in caught.value.problems[0].message
    assert path.read_text().endswith("# edited by hand\n")
    assert listing(path) == {"lab.toml", LOCK}


# --- 6. file shapes ------------------------------------------------------------------------


def test_crlf_file_keeps_crlf(tmp_path: Path) -> None:
    path = lab(tmp_path, EXAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    original = path.read_bytes()
    enroll(path, "aa:bb:cc:dd:ee:01", "web1", "192.168.1.40")
    k, inserted = insertion(original, path.read_bytes())
    assert k == len(original)
    assert inserted.startswith(b"\r\n# enrolled by pixiebox on ")
    assert inserted.endswith(b'ip = "192.168.1.40"\r\n')
    assert b"\n" not in inserted.replace(b"\r\n", b"")
    assert valid(path).machines[-1].name == "web1"


def test_file_without_trailing_newline(tmp_path: Path) -> None:
    path = lab(tmp_path, EXAMPLE.read_bytes().rstrip(b"\n"))
    original = path.read_bytes()
    done = enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    new = path.read_bytes()
    k, inserted = insertion(original, new)
    assert k == len(original)
    assert inserted.startswith(b"\n\n# enrolled by pixiebox on ")
    assert new.decode().splitlines()[done.line - 1] == "[[machines]]"
    assert [m.name for m in valid(path).machines] == ["c1", "c2", "web1"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(NETWORK, id="ends-with-newline"),
        pytest.param(NETWORK + "\n", id="ends-with-blank-line"),
        pytest.param(NETWORK.rstrip("\n"), id="no-trailing-newline"),
        pytest.param(NETWORK + "\n# no machines yet\n", id="ends-with-comment"),
    ],
)
def test_file_with_no_machines(tmp_path: Path, text: str) -> None:
    path = lab(tmp_path, text)
    original = path.read_bytes()
    done = enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    new = path.read_bytes()
    k, _ = insertion(original, new)
    assert k == len(original)
    lines = new.decode().splitlines()
    assert lines[done.line - 1] == "[[machines]]"
    assert lines[done.line - 2].startswith("# enrolled by pixiebox on ")
    # exactly one blank line before the comment
    assert lines[done.line - 3] == "" and lines[done.line - 4] != ""
    assert [m.name for m in valid(path).machines] == ["web1"]


def test_empty_file_is_refused_and_left_empty(tmp_path: Path) -> None:
    """An empty lab.toml has no [network] (issue 13): `pixiebox check` fails on it, so it
    is not edited (it used to get a lone [[machines]] block, on eth0 by default)."""
    path = lab(tmp_path, "")
    with pytest.raises(EnrollError) as refused:
        enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    assert "no [network] section" in str(refused.value)
    assert path.read_bytes() == b""


MIDDLE = (
    NETWORK
    + """
# The machines
[[machines]]
name = "c1"
mac = "f4:4d:30:64:7a:3a"
[machines.power]
driver = "wol"

[[machines]]
name = "c2"   # the second one
mac = "f4:4d:30:64:7a:3b"
# it has no ip yet

# Where state is kept.
[state]
dir = "/tmp/state"
"""
)


def test_block_goes_after_the_last_machine_not_at_the_end(tmp_path: Path) -> None:
    path = lab(tmp_path, MIDDLE)
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    # After c2's keys and the comment right below them; "# Where state..." stays with [state].
    k = MIDDLE.index("# it has no ip yet\n") + len("# it has no ip yet\n")
    block = '\n{}\n[[machines]]\nname = "web1"\nmac = "aa:bb:cc:dd:ee:01"\n'
    assert path.read_bytes() in {
        MIDDLE[:k].encode() + block.format(c.decode()).encode() + MIDDLE[k:].encode()
        for c in today_comments()
    }
    config = valid(path)
    assert [m.name for m in config.machines] == ["c1", "c2", "web1"]
    assert config.machines[0].power is not None
    assert str(config.state.dir) == "/tmp/state"


def test_comment_leading_into_the_next_table_stays_with_it(tmp_path: Path) -> None:
    text = NETWORK + '\n[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\n# state:\n[state]\n'
    path = lab(tmp_path, text)
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    k, _ = insertion(text.encode(), path.read_bytes())
    assert text[k:] == "# state:\n[state]\n"


def test_machines_split_around_another_table(tmp_path: Path) -> None:
    text = (
        NETWORK + '\n[[machines]]\nname = "c1"\nmac = "f4:4d:30:64:7a:3a"\n\n[state]\n'
        'dir = "/tmp/s"\n\n[[machines]]\nname = "c2"\nmac = "f4:4d:30:64:7a:3b"\n\n[http]\n'
    )
    path = lab(tmp_path, text)
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    inserted = inserted_at(text.encode(), path.read_bytes(), text.index("\n[http]"))
    assert inserted.startswith(b"\n# enrolled by pixiebox on ")
    assert [m.name for m in valid(path).machines] == ["c1", "c2", "web1"]


def test_tricky_values_before_the_machines(tmp_path: Path) -> None:
    """Headers and brackets inside strings, multi-line arrays and strings are not structure."""
    text = (
        NETWORK
        + '\n[images.osie]\nkernel = "osie/[[machines]]"\ninitrd = [\n  "a]", # ]\n  \'b[\',\n]\n'
        + 'cmdline = """\n[[machines]]\nname = "x"\\"""\n"""\n'
        + "\n[[machines]]\nname = 'c1'\nmac = \"f4:4d:30:64:7a:3a\"\n"
        + "[lab]\n'name' = '''it's\n[[machines]]'''\n"
    )
    path = lab(tmp_path, text)
    assert tomllib.loads(text)["images"]["osie"]["cmdline"].startswith("[[machines]]")
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    k, _ = insertion(text.encode(), path.read_bytes())
    assert text[k:] == "[lab]\n'name' = '''it's\n[[machines]]'''\n"
    assert [m.name for m in valid(path).machines] == ["c1", "web1"]


# --- 7. machines written as an inline array ------------------------------------------------


def test_inline_array_one_per_line(tmp_path: Path) -> None:
    text = (
        'machines = [\n  { name = "c1", mac = "f4:4d:30:64:7a:3a" },  # the first\n]\n\n' + NETWORK
    )
    path = lab(tmp_path, text)
    done = enroll(path, "aa:bb:cc:dd:ee:01", "web1", "192.168.1.40")
    new = path.read_bytes()
    k, inserted = insertion(text.encode(), new)
    assert text[:k].endswith("# the first\n")
    assert inserted in {
        b"  "
        + comment
        + b'\n  { name = "web1", mac = "aa:bb:cc:dd:ee:01", ip = "192.168.1.40" },\n'
        for comment in today_comments()
    }
    assert done.line == 4
    assert [m.name for m in valid(path).machines] == ["c1", "web1"]


def test_inline_array_without_trailing_comma(tmp_path: Path) -> None:
    text = 'machines = [\n    {name = "c1", mac = "f4:4d:30:64:7a:3a"}\n]\n' + NETWORK
    path = lab(tmp_path, text)
    enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    k, inserted = insertion(text.encode(), path.read_bytes())
    assert text[k:].startswith("\n]\n")
    assert inserted.startswith(b",\n    # enrolled by pixiebox on ")
    assert inserted.endswith(b'\n    {name = "web1", mac = "aa:bb:cc:dd:ee:01"}')
    assert [m.name for m in valid(path).machines] == ["c1", "web1"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'machines = [{ name = "c1", mac = "f4:4d:30:64:7a:3a" }]',
            'machines = [{ name = "c1", mac = "f4:4d:30:64:7a:3a" }, '
            '{ name = "web1", mac = "aa:bb:cc:dd:ee:01" }]',
        ),
        (
            'machines = [{name="c1",mac="f4:4d:30:64:7a:3a"},{name="c2",mac="f4:4d:30:64:7a:3b"},]',
            'machines = [{name="c1",mac="f4:4d:30:64:7a:3a"},{name="c2",mac="f4:4d:30:64:7a:3b"},'
            '{name = "web1", mac = "aa:bb:cc:dd:ee:01"},]',
        ),
        ("machines = []", 'machines = [{ name = "web1", mac = "aa:bb:cc:dd:ee:01" }]'),
    ],
)
def test_inline_array_on_one_line(tmp_path: Path, line: str, expected: str) -> None:
    """One line has no room for the dated comment: the entry is added without it."""
    path = lab(tmp_path, line + "  # keep me\n" + NETWORK)
    done = enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    assert path.read_text() == expected + "  # keep me\n" + NETWORK
    assert done.line == 1
    assert valid(path).machines[-1].name == "web1"


def test_inline_array_that_cannot_keep_its_style_is_refused(tmp_path: Path) -> None:
    text = 'machines = [\n  { name = "c1", mac = "f4:4d:30:64:7a:3a" }  # the first\n]\n' + NETWORK
    path = lab(tmp_path, text)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        enroll(path, "aa:bb:cc:dd:ee:01", "web1")
    before.assert_same()
    [problem] = caught.value.problems
    assert format_loc(problem.loc) == "machines"
    assert problem.line == 1
    assert "has no comma" in problem.message and '","' in problem.hint


# --- 8. update_machine ---------------------------------------------------------------------


def test_update_replaces_only_the_value(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_text()
    update_machine(path, "c2", ip="192.168.1.33")
    assert path.read_text() == original.replace('"192.168.1.32"', '"192.168.1.33"')
    update_machine(path, "F4-4D-30-64-7A-3A", ip=IPv4Address("192.168.1.41"))  # c1, by MAC
    assert path.read_text() == original.replace('"192.168.1.32"', '"192.168.1.33"').replace(
        '"192.168.1.31"', '"192.168.1.41"'
    )


def test_update_adds_a_missing_key_among_the_others(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_bytes()
    update_machine(path, "c1", image="osie")
    k, inserted = insertion(original, path.read_bytes())
    assert inserted == b'image = "osie"\n'
    assert original[:k].endswith(b'ip = "192.168.1.31"\n')  # before power, after ip
    assert valid(path).machines[0].image == "osie"


def test_update_removes_a_key(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_text()
    update_machine(path, "c1", power=None)
    assert path.read_text() == original.replace('power = { driver = "wol" }\n', "")
    update_machine(path, "c1", power=None)  # nothing to remove: nothing written
    assert valid(path).machines[0].power is None


def test_update_power(tmp_path: Path) -> None:
    path = lab(tmp_path)
    original = path.read_text()
    update_machine(path, "c1", power={"driver": "ssh", "host": "c1.lab.internal"})
    assert path.read_text() == original.replace(
        'power = { driver = "wol" }', 'power = { driver = "ssh", host = "c1.lab.internal" }'
    )


def test_update_crlf_and_no_trailing_newline(tmp_path: Path) -> None:
    text = EXAMPLE.read_bytes().replace(b"\n", b"\r\n").rstrip(b"\r\n")
    path = lab(tmp_path, text)
    update_machine(path, "c2", image="osie")  # c2 is the last lines of the file
    assert path.read_bytes() == text + b'\r\nimage = "osie"'
    assert valid(path).machines[1].image == "osie"


def test_update_inline_array_entry(tmp_path: Path) -> None:
    text = 'machines = [\n  { name = "c1", mac = "f4:4d:30:64:7a:3a", ip = "192.168.1.31" },\n]\n'
    path = lab(tmp_path, text + NETWORK)
    update_machine(path, "c1", ip="192.168.1.35", image="osie")
    assert path.read_text() == (
        'machines = [\n  { name = "c1", mac = "f4:4d:30:64:7a:3a", ip = "192.168.1.35", '
        'image = "osie" },\n]\n' + NETWORK
    )
    update_machine(path, "c1", ip=None)
    assert path.read_text().startswith(
        'machines = [\n  { name = "c1", mac = "f4:4d:30:64:7a:3a", image = "osie" },\n]\n'
    )
    assert valid(path).machines[0].ip is None


@pytest.mark.parametrize(
    ("target", "changes", "key", "message"),
    [
        pytest.param(
            "c1", {"colour": "red"}, "machines[0].colour", "unknown key 'colour'", id="key"
        ),
        pytest.param(
            "c9", {"ip": "192.168.1.40"}, "machines", "no machine 'c9' in lab.toml", id="who"
        ),
        pytest.param(
            "c1",
            {"ip": "192.168.1.220"},
            "network.pool",
            "the pool 192.168.1.200-192.168.1.250 overlaps the reservation of machine 'c1' "
            "(192.168.1.220, machines[0])",
            id="ip-in-pool",
        ),
        pytest.param(
            "c1",
            {"name": "c2"},
            "machines[1].name",
            "name c2 is already used by machine 'c2' (machines[0])",
            id="name-taken",
        ),
        pytest.param(
            "c2", {"mac": "nope"}, "machines[1].mac", "'nope' is not a MAC address", id="bad-mac"
        ),
        pytest.param(
            "c2", {"mac": None}, "machines[1].mac", "this key is required", id="remove-mac"
        ),
    ],
)
def test_update_refused_nothing_written(
    tmp_path: Path, target: str, changes: dict[str, object], key: str, message: str
) -> None:
    path = lab(tmp_path)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        update_machine(path, target, **changes)
    before.assert_same()
    assert shown(caught.value.problems) == [(key, message)]


def test_update_of_power_written_as_a_table_is_refused(tmp_path: Path) -> None:
    path = lab(tmp_path, MIDDLE)
    before = Unchanged(path)
    with pytest.raises(EnrollError) as caught:
        update_machine(path, "c1", power={"driver": "ssh"})
    before.assert_same()
    [problem] = caught.value.problems
    assert format_loc(problem.loc) == "machines[0].power"
    assert problem.line == MIDDLE.splitlines().index("[machines.power]") + 1
    # Other keys of that machine can still be changed.
    update_machine(path, "c1", ip="192.168.1.31")
    config = valid(path)
    assert config.machines[0].ip == IPv4Address("192.168.1.31")
    assert config.machines[0].power is not None
