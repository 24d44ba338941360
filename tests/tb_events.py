"""The events of a TensorBoard event file, read as TensorBoard reads them (TFRecord frames:
a u64 length, its u32 CRC, the serialized `Event`, the payload's u32 CRC), so that tests
check what a user would see without depending on TensorBoard itself."""

import struct


def read_events(path: str) -> list:
    """Every `Event` in the event file at `path`, in the order written."""
    from tensorboardX.proto import event_pb2

    data = open(path, "rb").read()
    events, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
        pos += 16 + n
    return events
