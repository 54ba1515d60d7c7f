"""The devmapper driver's pure parts: ``struct dm_ioctl`` packing and the kernel's answers,
thin-pool tables and status lines, the fill threshold, sizes, names, id allocation, the
reconciliation plan after a crash, the records file, and the probe's refusal on a kernel
without device-mapper."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imaged.config import Config
from imaged.drivers import registry
from imaged.drivers.devmapper import driver, ioctl, pool
from imaged.drivers.devmapper.records import Record, Records, reconcile
from imaged.errors import InternalError


def test_ioctl_numbers_match_the_kernel_header() -> None:
    """``_IOWR(0xfd, cmd, struct dm_ioctl)`` as strace prints them (e.g. DM_VERSION
    0xc138fd00): a wrong size would reach no ioctl at all."""
    assert ioctl.dm_request(ioctl.DM_VERSION_CMD) == 0xC138FD00
    assert ioctl.dm_request(ioctl.DM_DEV_CREATE_CMD) == 0xC138FD03
    assert ioctl.dm_request(ioctl.DM_TABLE_LOAD_CMD) == 0xC138FD09
    assert ioctl.dm_request(ioctl.DM_TARGET_MSG_CMD) == 0xC138FD0E


def test_request_header_and_payload() -> None:
    buffer = ioctl.pack_dm_ioctl("imaged-x-pool", b"payload", flags=ioctl.DM_SUSPEND_FLAG,
                              target_count=1, room=100)
    assert len(buffer) == 312 + 104  # room for the answer, 8-byte aligned
    fields = ioctl.DM_IOCTL.unpack_from(buffer)
    assert fields[:3] == (4, 0, 0)
    assert fields[3:6] == (len(buffer), 312, 1)  # data_size, data_start, target_count
    assert fields[7] == ioctl.DM_SUSPEND_FLAG
    assert fields[11].rstrip(b"\0") == b"imaged-x-pool"
    assert bytes(buffer[312:319]) == b"payload"


def test_names_longer_than_device_mapper_allows_are_refused() -> None:
    ioctl.pack_dm_ioctl("n" * 127)
    with pytest.raises(ValueError, match="longer than 127"):
        ioctl.pack_dm_ioctl("n" * 128)


def test_answer_is_read_up_to_data_size() -> None:
    header = ioctl.DM_IOCTL.pack(4, 48, 0, 312 + 5, 312, 2, 3, ioctl.DM_ACTIVE_PRESENT_FLAG, 0, 0,
                              (254 << 8) | 7, b"dev", b"", b"")
    parsed, data = ioctl.unpack_dm_ioctl(header + b"hello" + b"junk")
    assert data == b"hello"
    assert (parsed.version, parsed.target_count, parsed.open_count, parsed.name) == \
        ((4, 48, 0), 2, 3, "dev")
    assert pool.dev_string(parsed.dev) == "254:7"


def test_table_load_specs_link_to_the_next_one() -> None:
    targets = [ioctl.Target(0, 100, "linear", "7:0 0"), ioctl.Target(100, 50, "zero", "")]
    packed = ioctl.pack_targets(targets)
    start, length, _, next_offset, kind = ioctl.DM_TARGET_SPEC.unpack_from(packed, 0)
    assert (start, length, kind.rstrip(b"\0"), next_offset) == (0, 100, b"linear", 48)
    assert packed[40:46] == b"7:0 0\0"
    assert ioctl.DM_TARGET_SPEC.unpack_from(packed, 48)[:2] == (100, 50)
    assert len(packed) % 8 == 0


def test_status_answer_offsets_count_from_the_data_start() -> None:
    first = ioctl.DM_TARGET_SPEC.pack(0, 2048, 0, 56, b"thin-pool") + b"1 2/3 4/5 -\0".ljust(16,
                                                                                        b"\0")
    second = ioctl.DM_TARGET_SPEC.pack(2048, 8, 0, 0, b"error") + b"\0"
    assert ioctl.unpack_targets(first + second, 2) == [
        ioctl.Target(0, 2048, "thin-pool", "1 2/3 4/5 -"), ioctl.Target(2048, 8, "error", "")]


def test_device_and_version_lists() -> None:
    one = struct.pack("<QI", 0xFE00, 24) + b"pool\0".ljust(12, b"\0")
    two = struct.pack("<QI", 0xFE01, 0) + b"thin\0"
    assert ioctl.unpack_name_list(one + two) == [("pool", 0xFE00), ("thin", 0xFE01)]
    assert ioctl.unpack_name_list(struct.pack("<QI", 0, 0)) == []  # no devices
    versions = (struct.pack("<4I", 28, 1, 22, 0) + b"thin-pool\0".ljust(12, b"\0")
                + struct.pack("<4I", 0, 1, 4, 0) + b"zero\0")
    assert ioctl.unpack_versions(versions) == {"thin-pool": (1, 22, 0), "zero": (1, 4, 0)}


def test_tables() -> None:
    assert pool.pool_target(2048, "7:1", "7:0").line() == \
        "0 2048 thin-pool 7:1 7:0 128 0 1 error_if_no_space"
    assert pool.thin_target(65536, "254:0", 3).line() == "0 65536 thin 254:0 3"
    assert pool.parse_pool_table("7:1 7:0 128 0 1 error_if_no_space") == ("7:1", "7:0", 128)


@pytest.mark.parametrize(("line", "expected"), [
    ("5 1648/16384 968/16384 - rw discard_passdown error_if_no_space - 1024",
     pool.PoolStatus(5, 1648, 16384, 968, 16384, "rw")),
    ("7 1648/16384 16384/16384 - out_of_data_space discard_passdown error_if_no_space - 1024",
     pool.PoolStatus(7, 1648, 16384, 16384, 16384, "out_of_data_space")),
    ("9 10/20 1/2 - ro no_discard_passdown queue_if_no_space needs_check 5",
     pool.PoolStatus(9, 10, 20, 1, 2, "ro", needs_check=True)),
    ("Fail", pool.PoolStatus(0, 0, 0, 0, 0, "fail")),
])
def test_pool_status(line: str, expected: pool.PoolStatus) -> None:
    assert pool.parse_pool_status(line) == expected


def test_unexpected_pool_status_is_an_error() -> None:
    with pytest.raises(InternalError, match="unexpected thin-pool status"):
        pool.parse_pool_status("3 lots")


def test_usage_text_in_bytes_and_percent() -> None:
    status = pool.PoolStatus(1, 1638, 16384, 8192, 16384, "rw")
    assert pool.pool_usage_text(status, 128) == \
        "data 512 MiB of 1 GiB (50%), metadata 6.4 MiB of 64 MiB (10%)"


def test_fill_threshold() -> None:
    def refusal(data: int, meta: int = 1, mode: str = "rw",
                needs_check: bool = False) -> str | None:
        return pool.fill_refusal("p", pool.PoolStatus(0, meta, 100, data, 100, mode, needs_check),
                               128, 0.9)

    assert refusal(89) is None
    assert "above its fill threshold of 90%" in (refusal(90) or "")
    assert "fill_threshold" in (refusal(10, meta=95) or "")
    assert "out_of_data_space" in (refusal(10, mode="out_of_data_space") or "")
    assert "thin_check" in (refusal(10, needs_check=True) or "")
    assert "failed" in (refusal(0, mode="fail") or "")


def test_sizes_round_up_to_whole_pool_blocks() -> None:
    assert pool.device_sectors(64 << 20) == 131072
    assert pool.device_sectors(1) == 128
    assert pool.device_sectors((64 << 10) + 1) == 256


def test_ids_move_forward_skip_used_and_wrap() -> None:
    assert pool.allocate_id(0, set()) == 0
    assert pool.allocate_id(5, {5, 6}) == 7
    assert pool.allocate_id(pool.MAX_THIN_ID, {pool.MAX_THIN_ID}) == 0
    assert pool.allocate_id(pool.MAX_THIN_ID + 1, {0}) == 1


def test_names_are_per_root_and_fit() -> None:
    one, two = pool.root_tag(Path("/var/lib/a")), pool.root_tag(Path("/var/lib/b"))
    assert one != two and len(one) == 12
    assert pool.device_name(one, "pool") == f"imaged-{one}-pool"
    assert pool.device_name(one, pool.layer_key("f" * 64)) == f"imaged-{one}-l-{'f' * 64}"
    assert pool.device_name(one, pool.container_key("web")) == f"imaged-{one}-c-web"
    long = pool.device_name(one, pool.container_key("n" * 128))
    assert len(long) <= ioctl.MAX_NAME and long.startswith(f"imaged-{one}-ch-")
    assert long != pool.device_name(one, pool.container_key("n" * 127))


def test_reconciliation_plan() -> None:
    records = [Record("base", 0, "ready", 8), Record("l/a", 1, "ready", 8),
               Record("c/x", 2, "creating", 8), Record("dead/3", 3, "removing", 8)]
    plan = reconcile(records, None)  # transaction ids agree: records alone decide
    assert [r.id for r in plan.undo] == [2]
    assert [r.id for r in plan.finish] == [3]
    assert (plan.strays, plan.missing) == ((), ())
    plan = reconcile(records, {0, 2, 3, 7, 9})
    assert plan.strays == (7, 9)  # in the pool, in no record: deleted
    assert [r.key for r in plan.missing] == ["l/a"]  # recorded ready, not in the pool


def test_thin_ls_output() -> None:
    assert pool.parse_thin_ls("0\n1\n17\n\n") == {0, 1, 17}
    assert pool.parse_thin_ls("") == set()


def test_mkfs_and_mount_options() -> None:
    ext4 = driver.mkfs_command("ext4", Path("/dev/mapper/x"))
    assert ext4[:2] == ["mkfs.ext4", "-q"] and "4096" in ext4 and ext4[-1] == "/dev/mapper/x"
    assert driver.mkfs_command("xfs", Path("/dev/x"))[0] == "mkfs.xfs"
    assert driver.mount_options("ext4", read_only=False, discard=True) == ("discard",)
    assert driver.mount_options("ext4", read_only=True, discard=True) == ("ro",)
    assert driver.mount_options("xfs", read_only=False) == ("nouuid",)


def test_options_from_config() -> None:
    assert driver.Options.of(Config()) == driver.Options()
    options = driver.Options.of(Config(drivers={"devmapper": {"basesize": 32 << 20, "fs": "xfs"}}))
    assert (options.basesize, options.fs, options.data_size) == (32 << 20, "xfs", 100 << 30)
    assert "300 MiB" in (driver.config_problem(options) or "")


def test_records_survive_reopening(tmp_path: Path) -> None:
    records = Records(tmp_path / "devices.db")
    with records.transaction():
        records.put(Record("c/x", 4, "creating", 128, 64 << 20))
        records.set_counter("next_id", 5)
    records.rekey("c/x", "dead/4")
    records.put(Record("l/abc", 2, "ready", 128))
    records.close()
    again = Records(tmp_path / "devices.db")
    assert again.get("dead/4") == Record("dead/4", 4, "creating", 128, 64 << 20)
    assert [r.key for r in again.with_prefix("l/")] == ["l/abc"]
    assert (again.ids(), again.counter("next_id"), again.counter("unset")) == ({2, 4}, 5, 0)
    again.drop("l/abc")
    assert again.get("l/abc") is None
    again.close()


def test_probe_without_device_mapper_names_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_control() -> dict[str, tuple[int, int, int]]:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(ioctl, "dm_versions", no_control)
    monkeypatch.setattr(ioctl, "_PROC_MISC", tmp_path / "misc")
    (tmp_path / "misc").write_text(" 62 fuse\n")
    result = driver.probe(Config(root=tmp_path / "root"))
    assert not result.supported
    assert result.reason.startswith("device-mapper not in this kernel (")
    assert "/dev/mapper/control" in result.reason
    assert not (tmp_path / "root").exists()  # a probe creates nothing
    (tmp_path / "misc").write_text("236 device-mapper\n")
    assert "dmsetup mknodes" in driver.probe(Config(root=tmp_path / "root")).reason


def test_registered() -> None:
    probe, factory = registry()["devmapper"]
    assert probe is driver.probe and factory is driver.DevmapperDriver
