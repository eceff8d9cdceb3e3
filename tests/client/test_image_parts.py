"""The client SDK builds image parts from bytes, file paths and dicts (no server needed)."""

import pytest
from attnserve_client.request import generate_request, score_request
from attnserve_client.v1 import inference_service_pb2 as pb


def test_content_lists_become_text_and_image_parts(tmp_path):
    image_file = tmp_path / "cat.png"
    image_file.write_bytes(b"\x89PNG file bytes")
    request = generate_request(
        "tiny-llava",
        messages=[
            {"role": "system", "content": "be brief"},
            ("user", [image_file, "and", b"raw bytes", {"image": image_file}, {"text": "what?"}]),
        ],
    )
    system, user = request.chat.messages
    assert system == pb.ChatMessage(role="system", content="be brief")
    assert [p.WhichOneof("part") for p in user.parts] == ["image", "text", "image", "image", "text"]
    assert user.parts[0].image == user.parts[3].image == b"\x89PNG file bytes"
    assert user.parts[2].image == b"raw bytes" and user.parts[4].text == "what?"
    score = score_request("tiny-llava", ["yes"], messages=[("user", [b"img", "is it red?"])])
    assert [p.WhichOneof("part") for p in score.chat.messages[0].parts] == ["image", "text"]


def test_bad_parts():
    with pytest.raises(ValueError, match="exactly one key"):
        generate_request("m", messages=[("user", [{"image": b"x", "text": "y"}])])
    with pytest.raises(TypeError, match="encoded bytes or a file path"):
        generate_request("m", messages=[("user", [3.5])])
