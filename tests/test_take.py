"""Take files (streamv2v_core.live.take): written as the loop runs, read back under the file rule, bounded."""
import io
import json
import os

import pytest
import torch
from PIL import Image

from streamv2v.streamv2v_core.file_rules import FileRefused
from streamv2v.streamv2v_core.live.params import Capabilities, Change
from streamv2v.streamv2v_core.live.take import TAKE_FILE, TakeRecorder, extension_of, read_take


def jpeg(seed):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 40 % 255, 10, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def record(folder, frames=3):
    take = TakeRecorder(str(folder), "stage", {"seed": 5, "steps": 2, "strength": 0.4})
    for i in range(frames):
        take.frame(jpeg(i), 1000.0 + i * 33.3, i * 0.033)
        take.output(i, i * 33)
    take.change(1, Change(prompt="oil  painting\nlate", blend_frames=4))
    take.change(2, Change(seed=9, strength=0.6))
    return take


def test_a_take_reads_back_as_it_was_recorded(tmp_path):
    take = record(tmp_path / "t")
    take.close()
    back = read_take(str(tmp_path / "t"))
    assert back.complete and back.session == "stage" and back.settings["seed"] == 5
    assert [f["file"] for f in back.frames] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert back.frame_bytes(1) == jpeg(1)  # byte for byte
    assert back.output_ms == [0, 33, 66] and back.frames[2]["stamp"] == pytest.approx(1066.6)
    can = Capabilities(clip=True)
    changes = back.checked_changes(can)
    assert changes[1][0] == Change(prompt="oil  painting\nlate", blend_frames=4)
    assert changes[2][0] == Change(seed=9, strength=0.6)
    assert back.prompt_schedule("a photo") == "0: a photo\n1: oil painting late"
    assert (tmp_path / "t" / "prompt_schedule.txt").read_text() == "1: oil painting late\n"  # written at the end
    with pytest.raises(ValueError, match="change at frame 1 cannot be applied by this loop: the loop has no CLIP"):
        back.checked_changes(Capabilities())


def test_a_take_cut_short_keeps_what_was_written(tmp_path):
    take = record(tmp_path / "t")  # never closed: the process died
    with open(tmp_path / "t" / TAKE_FILE, "a") as file:
        file.write('{"frame": 3, "fi')  # half a line
    back = read_take(str(tmp_path / "t"))
    assert not back.complete and len(back.frames) == 3 and take.frames == 3


@pytest.mark.parametrize("line,message", [
    ('{"frame": 0, "file": "../../secret.jpg"}', "plain file name"),
    ('{"frame": 5, "file": "000000.jpg"}', "numbered 0, 1"),
    ('{"change": "x", "at": 1}', "an object"),
    ('[1, 2]', "not an object"),
])
def test_bad_lines_are_refused_with_their_number(tmp_path, line, message):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / TAKE_FILE).write_text(json.dumps({"take": 1, "settings": {}}) + "\n" + line + "\n{\"end\": {}}\n")
    with pytest.raises(ValueError, match=f"line 2 .*{message}"):
        read_take(str(folder))


def test_the_file_rule_holds_for_takes(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(jpeg(0))
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / TAKE_FILE).write_text(json.dumps({"take": 1, "settings": {}}) + "\n" +
                                    json.dumps({"frame": 0, "file": "000000.jpg"}) + "\n")
    os.symlink(outside / "x.jpg", folder / "000000.jpg")  # a link that leaves the take's folder
    with pytest.raises(FileRefused, match="leaves the allowed folder"):
        read_take(str(folder)).frame_bytes(0)
    os.remove(folder / TAKE_FILE)
    os.symlink(outside / "x.jpg", folder / TAKE_FILE)
    with pytest.raises(FileRefused):
        read_take(str(folder))
    with pytest.raises(ValueError, match="holds no take"):
        read_take(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / TAKE_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="does not start with a take header"):
        read_take(str(tmp_path / "junk"))


def test_recording_never_overwrites_and_stops_quietly_on_errors(tmp_path):
    record(tmp_path / "t").close()
    with pytest.raises(FileExistsError):
        TakeRecorder(str(tmp_path / "t"), "stage", {})
    take = TakeRecorder(str(tmp_path / "u"), "stage", {})
    os.chmod(tmp_path / "u", 0o500)  # a full disk / read-only folder from now on
    try:
        take.frame(jpeg(0), None, None)
        assert take.error is not None or os.geteuid() == 0  # root writes anyway
    finally:
        os.chmod(tmp_path / "u", 0o700)
    take.close()
    assert extension_of(b"\x89PNG....") == "png" and extension_of(b"??") == "bin"


def test_a_take_replays_the_frames_the_live_loop_decoded(tmp_path):
    from streamv2v.streamv2v_core.live.session import decode_frame
    from streamv2v.streamv2v_core.live.take import TakeSource

    record(tmp_path / "t").close()
    source = TakeSource(read_take(str(tmp_path / "t")), fit=lambda: (24, 32))
    frames = list(source)
    assert source.total == 3 and len(frames) == 3
    for i, frame in enumerate(frames):
        assert torch.equal(frame.image, decode_frame(jpeg(i), (24, 32)))
        assert frame.stamp == pytest.approx(1000.0 + i * 33.3) and frame.received_at == pytest.approx(i * 0.033)
