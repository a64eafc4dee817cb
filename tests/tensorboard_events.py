"""Reading TensorBoard event files back in tests, as TensorBoard shows them, without TensorBoard itself.

An event file is a sequence of records: uint64 length, uint32 masked CRC-32C of the length, the serialized `Event`
protobuf, uint32 masked CRC-32C of the data (both CRCs checked here). Files are read in name order (their names
start with the second they were opened). An event carrying SessionLog.START at step s (a resumed writer's purge
marker) hides every earlier scalar at step >= s, as TensorBoard's event accumulator does.
"""

import struct
from pathlib import Path

import numpy as np
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event, SessionLog


def _masked_crc(data: bytes) -> int:
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[Event]:
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert header_crc == _masked_crc(header) and body_crc == _masked_crc(body), f"corrupt record in {path}"
        events.append(Event.FromString(body))
        at += 16 + length
    return events


def read_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every scalar TensorBoard would show from the event files in `directory`."""
    scalars: dict[tuple[str, int], float] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {key: value for key, value in scalars.items() if key[1] < event.step}
            for value in event.summary.value:
                assert (value.tag, event.step) not in scalars, f"{value.tag} logged twice at step {event.step}"
                scalars[value.tag, event.step] = value.simple_value
    return scalars


def jsonl_scalars(records: list[dict]) -> dict[tuple[str, int], float]:
    """What metrics.jsonl's records should look like in TensorBoard: every value but kind and step, tagged
    "<kind>/<name>", at float32 (TensorBoard's scalar precision)."""
    return {(f"{record['kind']}/{name}", record["step"]): float(np.float32(value))
            for record in records for name, value in record.items() if name not in ("kind", "step")}
